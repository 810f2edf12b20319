"""The activation metric A(s, w) = |w * df(s)/dw| (docs/method.md section 1), batched and exact.

The paper scores a weight w on a sample s by the first-order Taylor importance of w for the
objective f(s) (default: the largest logit at the sample's last token). Computing it one
backward per sample on a model whose every parameter requires grad is slow; here a batch of
samples is scored in one forward+backward:

* Only activations require grad: the weights, the embeddings and the LM head never get a
  ``.grad`` (with tied embeddings that alone saves a vocab x hidden matrix per step).
* A linear layer y = x W^T has weight gradient sum_t g_t x_t^T. The batch objective is a sum of
  per-sample terms that do not interact, so the *per-sample* weight gradient of sample b is
  G_b = sum_t g_{b,t} x_{b,t}^T over that sample's own tokens. Hooks capture x on the forward
  pass and g on the backward pass and form G_b with one batched matmul.
* A_b = |W| * |G_b| in float32, whatever the model's dtype, is handed to *sinks* (mean
  accumulator, pair similarity, ...) and dropped: nothing the size of the model is kept per
  sample.

Summing the objectives of a batch and then taking |grad * w| would be wrong (|sum| != sum |.|);
the tests compare this module with a plain per-sample autograd loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..models.architectures import ScoredMatrix, scored_matrices
from ..registry import Registry

# --------------------------------------------------------------------------- objectives

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
OBJECTIVES: Registry[Objective] = Registry("objective")


def register_objective(name: str):
    def wrap(fn: Objective) -> Objective:
        return OBJECTIVES.add(name, fn)

    return wrap


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each sample's last real token (right padding)."""
    return attention_mask.long().sum(1) - 1


@register_objective("max-logit")
def max_logit(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """f(s) = max over the vocabulary of the logits at the sample's own last real token.

    Returns one value per sample. Only the needed positions are projected onto the vocabulary.
    """
    last = last_positions(attention_mask)
    keep, where = torch.unique(last, return_inverse=True)
    out = model(
        input_ids=None if inputs_embeds is not None else input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits[torch.arange(len(last), device=last.device), where]
    return logits.float().max(dim=-1).values


@register_objective("nll")
def mean_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """f(s) = mean next-token negative log-likelihood over the sample's real tokens."""
    out = model(
        input_ids=None if inputs_embeds is not None else input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        use_cache=False,
    )
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    mask = attention_mask[:, 1:].float()
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def get_objective(name: str) -> Objective:
    return OBJECTIVES.get(name)


# --------------------------------------------------------------------------- batched scoring


class Sink(Protocol):
    """Receives per-sample activations of one matrix: ``acts`` is (B, out, in) float32.

    Optional: ``wants(matrix) -> bool`` to skip matrices; ``add_abs_grad(matrix, abs_grad,
    abs_weight)`` instead of ``add`` for sinks that only need sums (|W| can be factored out of a
    sum over samples): it receives |G_b| (B, out, in) and |W| (out, in), both float32 in the
    stored layout, must not modify them and must not keep references (the buffer is reused).
    """

    def add(self, matrix: ScoredMatrix, acts: torch.Tensor) -> None: ...


class MeanAccumulator:
    """Running sum of A(s, w) over samples, in float32; ``mean()`` is the dataset's map."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # samples seen

    def end_batch(self, n: int) -> None:
        self.count += n

    def add(self, matrix: ScoredMatrix, acts: torch.Tensor) -> None:
        s = acts[0] if acts.shape[0] == 1 else acts.sum(0)  # no copy for a batch of one
        if matrix.name in self.sums:
            self.sums[matrix.name] += s
        else:
            self.sums[matrix.name] = s.clone()

    def add_abs_grad(self, matrix: ScoredMatrix, abs_grad: torch.Tensor,
                     abs_weight: torch.Tensor) -> None:
        """Faster path used by ``score_batch``: sum_b |W| |G_b| = |W| * sum_b |G_b|, so the
        product with |W| is taken once per batch instead of once per sample."""
        s = abs_grad[0] if abs_grad.shape[0] == 1 else abs_grad.sum(0)
        held = self.sums.get(matrix.name)
        if held is None:
            self.sums[matrix.name] = s * abs_weight
        else:
            held.addcmul_(s, abs_weight)

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: (v / max(self.count, 1)).cpu() for k, v in self.sums.items()}

    def take_mean(self) -> dict[str, torch.Tensor]:
        """``mean()`` formed in place of the sums, which it empties: no second copy of the maps
        is ever held (a 1.5B model's maps are 5.2 GB in float32)."""
        n, out = max(self.count, 1), {}
        for k in list(self.sums):
            out[k] = self.sums.pop(k).div_(n).cpu()
        return out


class _Hooks:
    """Forward/backward hooks on the scored matrices that form per-sample |W| * |G_b|."""

    def __init__(self, matrices: list[ScoredMatrix], sinks: list[Sink]):
        self.matrices = matrices
        self.sinks = sinks
        self.token_mask: torch.Tensor | None = None  # (B, T) float, set per batch
        self.padded = True  # whether token_mask has any zero (set per batch)
        self.handles: list = []

    def __enter__(self):
        for m in self.matrices:
            self.handles.append(m.module.register_forward_hook(self._forward(m)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward(self, m: ScoredMatrix):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            if not any(_wants(sink, m) for sink in self.sinks):
                return  # every sink already has this matrix (e.g. a batch retried after OOM)
            x = inputs[0].detach()
            # the weight as used by this forward: with accelerate's CPU/disk offload the module's
            # parameter is swapped back to "meta" after the layer ran, before the backward pass
            w = _current_weight(m)

            def on_grad(g: torch.Tensor) -> None:
                self._emit(m, x, g, w)

            output.register_hook(on_grad)

        return hook

    def _emit(self, m: ScoredMatrix, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
        # per-sample weight gradient, (B, out, in): sum over the sample's own tokens of g x^T
        batch, tokens = self.token_mask.shape
        x = x.reshape(batch, tokens, -1).float()
        if self.padded:  # zero the padding positions (a copy of x, so only when there are any)
            x = x * self.token_mask.to(x.device).unsqueeze(-1)
        g = g.reshape(batch, tokens, -1).float()
        grad = torch.bmm(g.transpose(1, 2), x).abs_()  # |G_b|
        if w.device != grad.device:
            w = w.to(grad.device)
        w_abs = w.float().abs()
        if m.transposed:  # GPT-2 Conv1D stores its weight (in, out): sinks get the stored layout
            grad, w_abs = grad.transpose(1, 2), w_abs.t()
        sinks = [sink for sink in self.sinks if _wants(sink, m)]
        plain = [sink for sink in sinks if not hasattr(sink, "add_abs_grad")]
        for sink in sinks:  # sinks that factor |W| out of their sums, before grad is overwritten
            if hasattr(sink, "add_abs_grad"):
                sink.add_abs_grad(m, grad, w_abs)
        if plain:
            acts = grad.mul_(w_abs.unsqueeze(0))  # A = |G_b| * |W|, in place
            for sink in plain:
                sink.add(m, acts)


def _current_weight(m: ScoredMatrix) -> torch.Tensor:
    """The matrix's weight (out, in) as this forward used it, also under accelerate offload.

    With per-module offload hooks the parameter is back on "meta" when forward hooks run; the
    offload hook's ``weights_map`` then holds the real tensor (CPU memory or a disk memmap).
    """
    w = m.weight.detach()
    if w.device.type != "meta":
        return w
    weights = getattr(getattr(m.module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{m.name}: weight is on the meta device and no offload hook holds it")
    w = weights["weight"].detach()
    return w.t() if m.transposed else w


def _wants(sink, m: ScoredMatrix) -> bool:
    """Sinks may define ``wants(matrix) -> bool`` to skip matrices (default: every matrix)."""
    wants = getattr(sink, "wants", None)
    return True if wants is None else bool(wants(m))


def score_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sinks: list[Sink],
    objective: str | Objective = "max-logit",
    matrices: list[ScoredMatrix] | None = None,
) -> torch.Tensor:
    """Score one right-padded batch; every sink receives each matrix's per-sample activations.

    Returns the objective values (one per sample). The model's parameters are left untouched
    (no ``.grad`` is created on any of them).
    """
    fn = get_objective(objective) if isinstance(objective, str) else objective
    matrices = matrices if matrices is not None else scored_matrices(model)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with _Hooks(matrices, sinks) as hooks, torch.enable_grad():
            hooks.token_mask = attention_mask.to(torch.float32)
            hooks.padded = bool((attention_mask == 0).any())
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            values = fn(model, input_ids, attention_mask, inputs_embeds=embeds)
            values.sum().backward()
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    for sink in sinks:
        if hasattr(sink, "end_batch"):
            sink.end_batch(input_ids.shape[0])
    return values.detach()


def pad_batch(sequences: list[list[int]], pad_id: int, device=None):
    """Right-pad token lists into (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
