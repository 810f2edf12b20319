"""Pruning: pruners (a registry), N:M patterns, the sequential calibration loop, saving.

The loop (as in Wanda / SparseGPT, written from their papers):

1. ``capture_layer_inputs``: every decoder layer's ``forward`` is swapped for a recorder for one
   model forward per calibration batch; layer 0's recorder keeps the hidden states, every
   layer's recorder keeps the other arguments it receives (attention mask, position embeddings,
   position ids: models such as Gemma-3 or Qwen2 give each layer its own mask), and the last
   one stops the forward (no LM head). Buffers are the calibration batches themselves, so
   their size follows the calibration sequence length, never ``max_position_embeddings``.
2. For each decoder layer in order: hooks on its scored matrices (``actpat.models
   .scored_matrices``, any layout: Conv1D weights are handled as (out, in)) accumulate input
   statistics over all calibration tokens while the layer runs on its inputs (Wanda: the
   squared column norms sum_t x_tj^2; SparseGPT: H = sum_t x_t x_t^T); matrices fed the very
   same input tensor (q/k/v, gate/up) share one accumulator. Each matrix is pruned, then the
   pruned layer runs again to produce the next layer's inputs.

Pruners (``PRUNERS``):

* ``magnitude``: the lowest |W| within each matrix (one threshold per matrix, as in Wanda's
  magnitude baseline); needs no calibration data.
* ``wanda``: score |W_ij| * ||X_j||_2; the lowest round(S_i * in) scores in every output row.
* ``sparsegpt``: optimal-brain-surgeon reconstruction with H = X^T X (dampened by 1% of its
  mean diagonal), columns processed in blocks of 128; the mask of each block is chosen when
  the block is reached (adaptive) from w^2 / [H^-1]_cc^2 over the whole block, and pruned
  weights' errors are compensated on the not yet processed columns.

Ties (dequantised GGUF weights share values) are broken by a stable sort: among equal scores
the lower column index is pruned first. Counts are rounded (never floored): a row keeps
``in - round(S_i * in)`` weights, so the achieved sparsity is within half a weight per row of
S_i. For ``magnitude`` the count is per matrix; for ``sparsegpt`` block counts follow the
rounded cumulative target, so every matrix ends within one weight of round(S_i * numel).

Patterns: ``unstructured``; ``N:M`` (``2:4``, ``4:8``): in every group of M consecutive input
weights of a row, the N lowest-scored are zeroed (SparseGPT chooses them inside the OBS
sweep, on the updated weights). The layer sparsities are then N/M whatever the allocation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models.loading import ScoredMatrix, decoder_layers, scored_matrices

PRUNE_RECORD = "actpat_prune.json"


# --------------------------------------------------------------------------- patterns


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M (N zeros per M)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        n = m = -1
    if not 0 < n < m:
        raise UserError(f"pattern '{pattern}' is not 'unstructured' or N:M with 0 < N < M "
                        "(e.g. 2:4, 4:8)")
    return n, m


def _prune_count(total: int, sparsity: float) -> int:
    """round(total * sparsity), halves rounded up (not Python's banker's rounding)."""
    return min(total, int(math.floor(total * sparsity + 0.5)))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean prune mask: in each row the round(S * cols) lowest scores (stable ties)."""
    return _lowest(scores, _prune_count(scores.shape[1], sparsity))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of each row, ties to the lower index: the first k of a
    stable ascending sort, found with ``kthvalue`` (about 3x faster than sorting on CPU)."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    need = k - below.sum(-1, keepdim=True)
    return below | (tied & (tied.cumsum(-1) <= need))


def matrix_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean prune mask: the ``count`` lowest scores of the whole matrix (stable ties)."""
    return _lowest(scores.flatten(), count).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean prune mask: the n lowest scores in each group of m consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"a matrix with {cols} input columns cannot take an N:M pattern with "
                        f"M={m}; use unstructured or an M dividing {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


# --------------------------------------------------------------------------- pruners


@dataclass(frozen=True)
class Pruner:
    """``stat``: the input statistic it needs ("norms", "hessian" or None).
    ``prune(weight (out, in) float32, stat, sparsity, nm) -> new weight (out, in)``."""

    name: str
    stat: str | None
    prune: Callable[[torch.Tensor, torch.Tensor | None, float, tuple[int, int] | None],
                    torch.Tensor]


PRUNERS: dict[str, Pruner] = {}


def register_pruner(pruner: Pruner) -> Pruner:
    PRUNERS[pruner.name] = pruner
    return pruner


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(mask, 0.0)


def magnitude_prune(weight, stat, sparsity, nm):
    scores = weight.abs()
    if nm:
        return _apply(weight, nm_mask(scores, *nm))
    return _apply(weight, matrix_mask(scores, _prune_count(weight.numel(), sparsity)))


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 from the per-column sums of squared inputs."""
    return weight.abs() * sumsq.to(weight.dtype).sqrt().unsqueeze(0)


def wanda_prune(weight, sumsq, sparsity, nm):
    scores = wanda_scores(weight, sumsq)
    return _apply(weight, nm_mask(scores, *nm) if nm else row_mask(scores, sparsity))


def sparsegpt_prune(weight, hessian, sparsity, nm, blocksize: int = 128,
                    percdamp: float = 0.01):
    """SparseGPT (Frantar & Alistarh 2023) for one matrix; returns the pruned, updated weight."""
    w = weight.clone().double()
    rows, cols = w.shape
    if nm and cols % nm[1]:
        nm_mask(w, *nm)  # raises the UserError
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, percdamp)
    target_total = _prune_count(rows * cols, sparsity)
    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # cumulative rounding: after this block, round(S * rows * i2) weights are pruned
            count = _prune_count(rows * i2, sparsity) - pruned_so_far
            count = min(count, target_total - pruned_so_far)
            mask1 = matrix_mask(w1 ** 2 / d.unsqueeze(0) ** 2, count)
            pruned_so_far += count
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm and i % nm[1] == 0:
                group = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i:i + nm[1]] = nm_mask(group, *nm)
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = percdamp * mean diag(H); the damping
    is raised tenfold (at most three times) if H is numerically not positive definite."""
    mean_diag = torch.diag(h).mean()
    for attempt in range(4):
        damped = h + percdamp * (10 ** attempt) * mean_diag * torch.eye(
            h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise UserError("SparseGPT: the calibration Hessian is not positive definite even with "
                    "1000x damping; use more calibration samples or --pruner wanda")


register_pruner(Pruner("magnitude", None, magnitude_prune))
register_pruner(Pruner("wanda", "norms", wanda_prune))
register_pruner(Pruner("sparsegpt", "hessian", sparsegpt_prune))


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise UserError(f"unknown pruner '{name}': use one of {', '.join(PRUNERS)}")
    return PRUNERS[name]


# --------------------------------------------------------------------------- calibration inputs


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration hidden states per batch, and the other arguments each layer receives."""

    hidden: list[torch.Tensor]  # per batch, (B, T, H)
    extras: dict[int, list[tuple[tuple, dict]]]  # batch size -> per layer (args, kwargs)

    def call(self, layer: nn.Module, index: int, batch: int, hidden: torch.Tensor):
        args, kwargs = self.extras[hidden.shape[0]][index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _check_sequences(sequences: list[list[int]]) -> None:
    if not sequences:
        raise UserError("no calibration sequences; give --calibration-samples of at least 1")
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise UserError(f"calibration sequences must have equal lengths (got {sorted(lengths)})")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, sequences: list[list[int]],
                         batch_size: int = 8) -> LayerInputs:
    """Layer 0's hidden states for the calibration batches, and every layer's other arguments."""
    _check_sequences(sequences)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    extras: dict[int, list] = {}
    current: dict[int, tuple] = {}

    def recorder(i):
        def forward(*args, **kwargs):
            hs = args[0] if args else kwargs.pop("hidden_states")
            current[i] = (tuple(args[1:]), dict(kwargs))
            if i == 0:
                hidden.append(hs.detach())
            if i == len(layers) - 1:
                raise _Stop
            return hs
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's wrapper
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for b in range(0, len(sequences), batch_size):
            ids = torch.tensor(sequences[b:b + batch_size], dtype=torch.long, device=device)
            current.clear()
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            if ids.shape[0] not in extras:
                extras[ids.shape[0]] = [current[i] for i in range(len(layers))]
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = old
    return LayerInputs(hidden, extras)


class _InputStats:
    """Forward hooks accumulating each scored matrix's input statistic over calibration tokens."""

    def __init__(self, mats: list[ScoredMatrix], kind: str):
        self.kind = kind
        self.stats: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # matrix fed the same tensor as an earlier one
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.module.register_forward_hook(self._hook(m.name)) for m in mats]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            for t, owner in self._seen:
                if t is x:
                    self.alias.setdefault(name, owner)
                    return
            self._seen.append((x, name))
            x = x.reshape(-1, x.shape[-1])
            if self.kind == "norms":
                value = (x.double() ** 2).sum(0)
            else:
                x = x.float()
                value = x.t() @ x
            if name in self.stats:
                self.stats[name] += value
            else:
                self.stats[name] = value
        return hook

    def end_batch(self) -> None:
        self._seen.clear()

    def get(self, name: str) -> torch.Tensor:
        return self.stats[self.alias.get(name, name)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _layer_matrices(model) -> dict[int, list[ScoredMatrix]]:
    out: dict[int, list[ScoredMatrix]] = {}
    for sm in scored_matrices(model):
        out.setdefault(sm.layer, []).append(sm)
    return out


@torch.no_grad()
def collect_input_norms(model: nn.Module, sequences: list[list[int]], batch_size: int = 8,
                        progress: bool = False) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input column of every scored matrix, from a dense sequential pass
    (each layer runs on the outputs of the unpruned previous layers). Used by ``owl``."""
    from tqdm.auto import tqdm

    inputs = capture_layer_inputs(model, sequences, batch_size)
    per_layer = _layer_matrices(model)
    norms: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model)
    for i in tqdm(range(len(layers)), desc="input norms", unit="layer", disable=not progress):
        stats = _InputStats(per_layer[i], "norms")
        try:
            outs = []
            for b, hs in enumerate(inputs.hidden):
                outs.append(inputs.call(layers[i], i, b, hs))
                stats.end_batch()
        finally:
            stats.remove()
        for sm in per_layer[i]:
            norms[sm.name] = stats.get(sm.name).sqrt().float()
        inputs.hidden = outs
    return norms


def _set_weight(sm: ScoredMatrix, weight: torch.Tensor) -> None:
    w = weight.t() if sm.transposed else weight
    sm.module.weight.data.copy_(w.to(sm.module.weight.dtype))


@torch.no_grad()
def prune_model(model: nn.Module, calib_sequences: list[list[int]] | None,
                sparsities: list[float], pruner: str = "wanda", pattern: str = "unstructured",
                batch_size: int = 8, progress: bool = True) -> dict:
    """Prune ``model`` in place, layer by layer; returns a report.

    ``calib_sequences``: equal-length token sequences (ignored by ``magnitude``).
    ``sparsities``: S_i per decoder layer (ignored for N:M patterns, which give N/M).
    Report: per matrix and per layer target and achieved sparsity, overall achieved, seconds.
    """
    from tqdm.auto import tqdm

    from .allocation import check_sparsity

    p = get_pruner(pruner)
    nm = parse_pattern(pattern)
    layers = decoder_layers(model)
    if len(sparsities) != len(layers):
        raise UserError(f"{len(sparsities)} layer sparsities for a model with {len(layers)} "
                        "decoder layers; give one per layer")
    sparsities = [check_sparsity(s) for s in sparsities]
    if nm:
        sparsities = [nm[0] / nm[1]] * len(layers)
    start = time.perf_counter()
    per_layer = _layer_matrices(model)
    inputs = None
    if p.stat is not None:
        if calib_sequences is None:
            raise UserError(f"pruner '{pruner}' needs calibration data")
        inputs = capture_layer_inputs(model, calib_sequences, batch_size)
    report = {"pruner": pruner, "pattern": pattern, "matrices": [], "layers": []}
    for i in tqdm(range(len(layers)), desc=f"pruning ({pruner})", unit="layer",
                  disable=not progress):
        stats = None
        if inputs is not None:
            stats = _InputStats(per_layer[i], p.stat)
            try:
                for b, hs in enumerate(inputs.hidden):
                    inputs.call(layers[i], i, b, hs)
                    stats.end_batch()
            finally:
                stats.remove()
        zeros = total = 0
        for sm in per_layer[i]:
            w = sm.weight.detach().float()
            if sparsities[i] > 0 or nm:
                w = p.prune(w, None if stats is None else stats.get(sm.name), sparsities[i], nm)
                _set_weight(sm, w)
            z = int((sm.module.weight == 0).sum())
            zeros += z
            total += w.numel()
            report["matrices"].append({"name": sm.name, "layer": i, "matrix": sm.matrix,
                                       "shape": list(w.shape), "target": sparsities[i],
                                       "achieved": z / w.numel()})
        del stats
        report["layers"].append({"layer": i, "target": sparsities[i], "achieved": zeros / total,
                                 "weights": total})
        if inputs is not None and i + 1 < len(layers):
            inputs.hidden = [inputs.call(layers[i], i, b, hs) for b, hs in
                             enumerate(inputs.hidden)]
    n_total = sum(x["weights"] for x in report["layers"])
    report["achieved_sparsity"] = sum(x["achieved"] * x["weights"] for x in report["layers"]) \
        / n_total
    report["target_sparsity"] = sum(x["target"] * x["weights"] for x in report["layers"]) / n_total
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def model_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights among all scored matrices."""
    zeros = total = 0
    for sm in scored_matrices(model):
        zeros += int((sm.module.weight == 0).sum())
        total += sm.module.weight.numel()
    return zeros / total


# --------------------------------------------------------------------------- saving


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, record: dict) -> Path:
    """Write a Hugging Face checkpoint (safetensors, config without ``quantization_config``,
    tokenizer) and ``actpat_prune.json`` (``record`` plus the achieved sparsity)."""
    from ..activation.profiling import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    saved_quant = config.__dict__.pop("quantization_config", None)
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if saved_quant is not None:
            config.quantization_config = saved_quant
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = dict(record)
    record.setdefault("achieved_sparsity", model_sparsity(model))
    write_json(out / PRUNE_RECORD, record)
    return out


def load_record(directory: str | Path) -> dict | None:
    """The ``actpat_prune.json`` of a pruned checkpoint, or None for other directories."""
    path = Path(directory) / PRUNE_RECORD
    return json.loads(path.read_text()) if path.exists() else None


from ..data.calibration import calibration_sequences  # noqa: E402,F401  (part of this module's API)
