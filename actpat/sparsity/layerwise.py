"""The one sequential pruning loop: capture each decoder layer's inputs, prune, run on.

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

The pruners themselves (``pruners``) and the masks (``masks``) are pure functions of one matrix;
the loop only collects what a pruner's ``stat`` asks for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..models.architectures import ScoredMatrix, decoder_layers, scored_matrices
from .masks import parse_pattern, validate_sparsity
from .pruners import get_pruner


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

    p = get_pruner(pruner)
    nm = parse_pattern(pattern)
    layers = decoder_layers(model)
    sparsities = layer_targets(sparsities, len(layers), nm)
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
        prune_layer(layers[i], i, per_layer[i], p, sparsities, nm, inputs, report)
        if inputs is not None and i + 1 < len(layers):
            inputs.hidden = [inputs.call(layers[i], i, b, hs) for b, hs in
                             enumerate(inputs.hidden)]
    return finish_report(report, start)


def layer_targets(sparsities: list[float], n_layers: int,
                  nm: tuple[int, int] | None) -> list[float]:
    """The S_i the loop prunes to: one valid sparsity per layer (N/M for an N:M pattern)."""
    if len(sparsities) != n_layers:
        raise UserError(f"{len(sparsities)} layer sparsities for a model with {n_layers} "
                        "decoder layers; give one per layer")
    if nm:
        return [nm[0] / nm[1]] * n_layers
    per_matrix = getattr(sparsities, "per_matrix", None)  # a per_matrix.MatrixSparsities
    for v in [sparsities] if per_matrix is None else per_matrix.values():
        for x in v:
            validate_sparsity(x)
    return sparsities if per_matrix is not None else [float(x) for x in sparsities]


def matrix_target(sparsities, i: int, matrix: str) -> float:
    """The sparsity of matrix type ``matrix`` in layer ``i``: its own under a per-matrix
    allocation, else the layer's S_i."""
    per_matrix = getattr(sparsities, "per_matrix", None)
    return float(sparsities[i] if per_matrix is None else per_matrix[matrix][i])


def prune_layer(layer: nn.Module, i: int, matrices: list[ScoredMatrix], p, sparsities,
                nm: tuple[int, int] | None, inputs, report: dict) -> None:
    """One step of the sequential loop: collect the pruner's input statistic on layer ``i``
    (its calibration inputs, when the pruner needs one), prune each of its matrices to its
    target in ``sparsities`` (``matrix_target``; N:M when ``nm``), and append what was achieved
    to ``report``. The caller moves the calibration inputs on through the pruned layer."""
    stats = None
    if inputs is not None:
        stats = _InputStats(matrices, p.stat)
        try:
            for b, hs in enumerate(inputs.hidden):
                inputs.call(layer, i, b, hs)
                stats.end_batch()
        finally:
            stats.remove()
    zeros = total = 0
    target = 0.0
    for sm in matrices:
        sparsity = matrix_target(sparsities, i, sm.matrix)
        w = sm.weight.detach().float()
        if sparsity > 0 or nm:
            w = p.prune(w, None if stats is None else stats.get(sm.name), sparsity, nm)
            _set_weight(sm, w)
        z = int((sm.module.weight == 0).sum())
        zeros += z
        total += w.numel()
        target += sparsity * w.numel()
        report["matrices"].append({"name": sm.name, "layer": i, "matrix": sm.matrix,
                                   "shape": list(w.shape), "target": sparsity,
                                   "achieved": z / w.numel()})
    per_layer = getattr(sparsities, "per_matrix", None) is None
    report["layers"].append({"layer": i,
                             "target": float(sparsities[i]) if per_layer else target / total,
                             "achieved": zeros / total, "weights": total})


def finish_report(report: dict, start: float) -> dict:
    """Add the overall (weight-weighted) target and achieved sparsity and the seconds."""
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


def prune_offloaded(model, calib_sequences, sparsities, pruner="wanda", pattern="unstructured",
                    batch_size=8, progress=True, device: torch.device | str = "cuda"):
    """``prune_model`` with only the current decoder layer on ``device``.

    The embeddings and the LM head stay on the CPU (the calibration inputs are captured there);
    each decoder layer comes onto ``device`` for its calibration passes and its pruning, then
    goes back. The report gains ``offload`` (the device and the order layers were loaded in).
    """
    from ..models.offload import LayerOffload

    model.to("cpu")
    with LayerOffload(model, device) as off:
        report = prune_model(model, calib_sequences, sparsities, pruner, pattern, batch_size,
                             progress)
    report["offload"] = {"compute_device": str(torch.device(device)), "layers_loaded": off.moves}
    return report
