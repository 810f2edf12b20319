"""Depth pruning: score decoder layers, choose K of them, remove them for real.

Removing whole decoder layers needs no sparse kernel: the saved model simply has fewer layers,
so it is smaller on disk and in memory and runs faster with any dense runtime.

Layer scores (one number per decoder layer; the layers with the *lowest* scores go first):

* ``activation``: the paper's N_i (METHOD.md section 4), the number of the layer's scored
  weights whose mean activation |W * dF/dW| exceeds gamma, with gamma the 0.1 quantile of all
  scored weights of the profile (the statistic Finding 1 plots and the activation allocation
  uses). A layer with few activated weights is the one the allocation already prunes hardest;
  removing it is the limit S_i = 1 of that rule. The count is used rather than the layer's
  share of the summed activation mass because the maps are heavy-tailed: the sum is set by a
  handful of outlier weights, the count by how many weights matter at all. ``statistic="mass"``
  gives the sum, for comparison.
* ``block-influence`` (ShortGPT, Men et al. 2024): 1 - cos(x_in, x_out) of the layer's input
  and output hidden states, averaged over every calibration token. A layer that barely turns
  its input changes the residual stream least. Hidden states are read by hooks on the layers
  themselves, so the last layer's output is taken before the final norm.
* ``search``: a cheap greedy search. Starting from the dense model it removes one layer at a
  time; at each step the ``width`` lowest-ranked remaining layers of a seed ranking (the
  activation ranking) are tried, and the one whose removal gives the lowest loss on held-apart
  calibration windows is kept. Loss: mean per-token KL(dense || pruned) of the next-token
  distributions (default), or the windows' perplexity. K * width evaluations, deterministic
  (ties go to the candidate ranked first).

``remove_layers`` deletes the chosen layers in place: the layer ``ModuleList`` is rebuilt,
``num_hidden_layers`` and every per-layer list of the config (``layer_types`` ...) are cut to
the kept layers, and every ``layer_idx`` inside a kept layer is renumbered 0..K'-1 so that the
KV cache, which the model builds from its config, has one slot per remaining layer.
``without_layers`` does the same for the duration of a ``with`` block and then restores the
model (the search's trial removals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..models.architectures import decoder_layers, get_adapter

LAYER_SCORES = ("activation", "block-influence", "search")
SEARCH_OBJECTIVES = ("kl", "ppl")


# --------------------------------------------------------------------------- scores


def activation_scores(profile, gamma: float | None = None, gamma_quantile: float | None = 0.1,
                      statistic: str = "count") -> list[float]:
    """Per decoder layer: N_i at gamma (``count``) or the summed mean activation (``mass``)."""
    if statistic == "count":
        from ..activation.profiling import counts

        return [float(c) for c in counts(profile, gamma, gamma_quantile).layer_counts]
    if statistic == "mass":
        mass = [0.0] * profile.num_layers
        for name, v in profile.maps.items():
            mass[profile.layers[name]] += float(v.double().sum())
        return mass
    raise UserError(f"unknown activation statistic '{statistic}': use count or mass")


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_influence(model: nn.Module, sequences: Sequence[Sequence[int]],
                    batch_size: int = 8) -> list[float]:
    """ShortGPT's Block Influence per decoder layer: 1 - mean_t cos(x_in_t, x_out_t).

    ``sequences``: equal-length token windows (no padding, so every token counts once).
    """
    _check_windows(sequences)
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0

    def hook(i):
        def record(module, args, kwargs, out):
            x, y = _hidden(args, kwargs).float(), _output(out).float()
            cos = nn.functional.cosine_similarity(x, y, dim=-1)  # (B, T)
            sums[i] += cos.double().sum().cpu()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for b in range(0, len(sequences), batch_size):
            ids = torch.tensor(sequences[b:b + batch_size], dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [float(1.0 - s / tokens) for s in sums]


def removal_order(scores: Sequence[float]) -> list[int]:
    """Layer indices, lowest score first; equal scores keep the lower index first."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def check_drop(k: int, num_layers: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < num_layers:
        raise UserError(f"cannot remove {k} of {num_layers} decoder layers; give "
                        f"--drop-layers between 0 and {num_layers - 1}")
    return k


def lowest_layers(scores: Sequence[float], k: int) -> list[int]:
    """The k layers removed by a fixed ranking, in ascending index order."""
    check_drop(k, len(scores))
    return sorted(removal_order(scores)[:k])


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """The greedy search's choice and every trial it made (for the prune record)."""

    removed: list[int]  # in removal order
    objective: str
    width: int
    dense_loss: float
    steps: list[dict] = field(default_factory=list)  # {"trials": {layer: loss}, "chosen": i}

    def to_json(self) -> dict:
        return {"removed_in_order": self.removed, "objective": self.objective,
                "width": self.width, "dense_loss": self.dense_loss,
                "evaluations": sum(len(s["trials"]) for s in self.steps), "steps": self.steps}


class _Objective:
    """Loss of the model on fixed windows: mean per-token KL to the dense model, or mean NLL
    (perplexity = exp of it). The dense log-probabilities are computed once and kept."""

    def __init__(self, model, sequences, kind: str, batch_size: int):
        if kind not in SEARCH_OBJECTIVES:
            raise UserError(f"unknown search objective '{kind}': use one of "
                            f"{', '.join(SEARCH_OBJECTIVES)}")
        _check_windows(sequences)
        self.model, self.kind, self.batch_size = model, kind, batch_size
        device = next(model.parameters()).device
        self.batches = [torch.tensor(sequences[b:b + batch_size], dtype=torch.long,
                                     device=device)
                        for b in range(0, len(sequences), batch_size)]
        self.dense = [self._logprobs(x) for x in self.batches] if kind == "kl" else None

    def _logprobs(self, x):
        return torch.log_softmax(self.model(input_ids=x, use_cache=False).logits.float(), -1)

    @torch.no_grad()
    def __call__(self) -> float:
        total, count = 0.0, 0
        for b, x in enumerate(self.batches):
            logp = self._logprobs(x)
            if self.kind == "kl":
                ref = self.dense[b]
                total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
                count += x.numel()
            else:
                nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
                total += float(nll.double().sum())
                count += x[:, 1:].numel()
        return total / count


@torch.no_grad()
def search_layers(model: nn.Module, k: int, seed_order: Sequence[int],
                  sequences: Sequence[Sequence[int]], width: int = 4, objective: str = "kl",
                  batch_size: int = 8, progress: bool = False) -> SearchResult:
    """Greedy choice of k layers to remove (see the module doc); ``seed_order`` ranks every
    layer, most removable first (e.g. ``removal_order(activation_scores(...))``)."""
    from tqdm.auto import tqdm

    n = len(decoder_layers(model))
    check_drop(k, n)
    if sorted(seed_order) != list(range(n)):
        raise UserError(f"the seed ranking must list each of the {n} layers once")
    if width < 1:
        raise UserError(f"--layer-search-width must be at least 1 (got {width})")
    loss = _Objective(model, sequences, objective, batch_size)
    result = SearchResult([], objective, width, loss() if objective == "ppl" else 0.0)
    bar = tqdm(total=k, desc=f"layer search ({objective})", unit="layer", disable=not progress)
    for _ in range(k):
        candidates = [i for i in seed_order if i not in result.removed][:width]
        trials = {}
        for c in candidates:
            with without_layers(model, result.removed + [c]):
                trials[c] = loss()
        chosen = min(candidates, key=lambda c: trials[c])  # min keeps the first of equals
        result.removed.append(chosen)
        result.steps.append({"trials": {str(c): v for c, v in trials.items()},
                             "chosen": chosen})
        bar.update(1)
    bar.close()
    return result


def choose_layers(model: nn.Module, k: int, score: str, *,
                  activation: Sequence[float] | None = None,
                  calibration: Sequence[Sequence[int]] | None = None,
                  held_apart: Sequence[Sequence[int]] | None = None, width: int = 4,
                  objective: str = "kl", batch_size: int = 8,
                  progress: bool = False) -> tuple[list[int], dict]:
    """The k layers ``score`` removes, and why (the record ``actpat_prune.json`` keeps).

    ``activation``: per-layer N_i (``activation`` and the seed ranking of ``search``);
    ``calibration``: windows for ``block-influence``; ``held_apart``: the search's windows,
    which should share no token with ``calibration`` or with any evaluation data."""
    if score not in LAYER_SCORES:
        raise UserError(f"unknown layer score '{score}': use one of {', '.join(LAYER_SCORES)}")
    n = len(decoder_layers(model))
    check_drop(k, n)
    why: dict = {"layer_score": score, "drop_layers": k}
    if score in ("activation", "search"):
        if activation is None or len(activation) != n:
            raise UserError(f"the {score} layer score needs the activation counts of all {n} "
                            "layers (a profile of this model)")
        why["activation_counts"] = [float(x) for x in activation]
    if score == "activation":
        drop = lowest_layers(activation, k)
    elif score == "block-influence":
        if calibration is None:
            raise UserError("the block-influence layer score needs calibration windows")
        why["block_influence"] = block_influence(model, calibration, batch_size)
        drop = lowest_layers(why["block_influence"], k)
    else:
        if held_apart is None:
            raise UserError("the search layer score needs held-apart calibration windows; "
                            "give --layer-search-samples of at least 1")
        res = search_layers(model, k, removal_order(activation), held_apart, width, objective,
                            batch_size, progress)
        why["search"] = res.to_json()
        drop = sorted(res.removed)
    why["removed"] = drop
    return drop, why


# --------------------------------------------------------------------------- removal


def _check_windows(sequences) -> None:
    if not sequences:
        raise UserError("no calibration windows; give --calibration-samples of at least 1")
    if len({len(s) for s in sequences}) != 1:
        raise UserError("calibration windows must have equal lengths")


def _layer_config(model: nn.Module):
    """The config that counts the decoder layers (the text config of a multimodal wrapper)."""
    n = len(decoder_layers(model))
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "num_hidden_layers", None) == n:
            return cfg
    raise UserError(f"the model's config does not say it has {n} decoder layers; actpat "
                    "cannot remove layers from it")


def _per_layer_lists(cfg, n: int) -> list[str]:
    """Config attributes holding one entry per layer (``layer_types``, ...)."""
    return [key for key, value in vars(cfg).items()
            if isinstance(value, (list, tuple)) and len(value) == n and not key.startswith("_")]


def _apply(model: nn.Module, drop: Sequence[int]):
    """Remove the ``drop`` layers; return a function that undoes it."""
    layers = decoder_layers(model)
    n = len(layers)
    if len(set(drop)) != len(drop) or any(not 0 <= int(i) < n for i in drop):
        raise UserError(f"layer indices {list(drop)} are not distinct indices in 0..{n - 1}")
    drop = sorted(int(i) for i in drop)
    if len(drop) >= n:
        raise UserError(f"cannot remove all {n} decoder layers")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UserError("this GPT-2 config scales attention by the layer index, so removing "
                        "layers would change the kept layers' maths; depth pruning refuses it")
    keep = [i for i in range(n) if i not in drop]
    cfg = _layer_config(model)
    lists = {key: getattr(cfg, key) for key in _per_layer_lists(cfg, n)}
    old_idx = []
    for new, old in enumerate(keep):
        for module in layers[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                old_idx.append((module, module.layer_idx))
                module.layer_idx = new
    parent_path, _, attr = get_adapter(model).layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for key, value in lists.items():
        setattr(cfg, key, type(value)(value[i] for i in keep))
    cfg.num_hidden_layers = len(keep)

    def undo():
        setattr(parent, attr, layers)
        for key, value in lists.items():
            setattr(cfg, key, value)
        cfg.num_hidden_layers = n
        for module, idx in old_idx:
            module.layer_idx = idx

    return undo, keep, list(lists)


def remove_layers(model: nn.Module, drop: Sequence[int]) -> dict:
    """Delete the ``drop`` decoder layers of ``model`` in place (see the module doc).

    Returns ``{"removed", "kept", "num_layers_before", "num_layers_after",
    "per_layer_config"}``; ``kept[j]`` is the original index of the new layer j."""
    before = len(decoder_layers(model))
    _, keep, lists = _apply(model, drop)
    return {"removed": sorted(set(drop)), "kept": keep, "num_layers_before": before,
            "num_layers_after": len(keep), "per_layer_config": lists}


@contextmanager
def without_layers(model: nn.Module, drop: Sequence[int]):
    """The model with the ``drop`` layers removed inside the block, restored after it."""
    undo, _, _ = _apply(model, drop)
    try:
        yield model
    finally:
        undo()


def removed_parameters(model: nn.Module, drop: Sequence[int]) -> int:
    """Parameters held by the ``drop`` layers (what removing them saves)."""
    layers = decoder_layers(model)
    return sum(p.numel() for i in set(drop) for p in layers[i].parameters())


def equivalent_sparsity(model: nn.Module, drop: Sequence[int]) -> float:
    """The unstructured sparsity of the scored matrices that removes as many weights as
    removing the ``drop`` layers' scored matrices does (k / L when layers are equal)."""
    from ..models.architectures import scored_matrices

    mats = scored_matrices(model)
    total = sum(m.module.weight.numel() for m in mats)
    gone = sum(m.module.weight.numel() for m in mats if m.layer in set(drop))
    return gone / total if total else math.nan
