"""Streamed pruning: the sequential loop of ``layerwise`` with one decoder layer in memory.

``prune_streamed`` is ``layerwise.prune_model`` on a ``models.streamed.StreamedModel``: the
calibration inputs of layer 0 and every layer's other arguments are captured with the same
stand-ins (``capture_layer_inputs``: the layers' weights are never touched); then for each
layer in order it is read from the checkpoint, its input statistics collected with the same
hooks (``_InputStats``), its matrices pruned by the same pruners, the pruned layer written to
its own shard ``model-<i>-of-<n>.safetensors`` of the output checkpoint, run on to produce the
next layer's inputs, and freed. The resident tensors (embeddings, final norm, LM head) go into
the last shard; ``model.safetensors.index.json``, ``config.json`` and the tokenizer make the
directory an ordinary Hugging Face checkpoint. Same masks and weights as the in-memory loop
(the arithmetic is the same, in the same order).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..models.architectures import scored_matrices
from ..models.streamed import INDEX_FILE, StreamedModel, write_safetensors
from .layerwise import capture_layer_inputs, finish_report, layer_targets, prune_layer
from .masks import parse_pattern
from .pruners import get_pruner

SHARD = "model-{:05d}-of-{:05d}.safetensors"


def shard_names(directory: str | Path) -> tuple[str, ...]:
    """Names of streamed-prune shards already in ``directory`` (a re-run may overwrite them)."""
    import re

    d = Path(directory)
    if not d.is_dir():
        return ()
    return tuple(p.name for p in d.iterdir()
                 if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors(\.tmp)?", p.name))


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings)."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous()
    return out


def _write_shard(out: Path, name: str, tensors: dict[str, torch.Tensor],
                 weight_map: dict[str, str], dtype: torch.dtype) -> int:
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    size = write_safetensors(out / name, tensors, {"format": "pt"})
    for k in tensors:
        weight_map[k] = name
    return size


@torch.no_grad()
def prune_streamed(sm: StreamedModel, calib_sequences: list[list[int]] | None,
                   sparsities: list[float], out_dir: str | Path, pruner: str = "wanda",
                   pattern: str = "unstructured", batch_size: int = 8,
                   progress: bool = True, save_dtype: str | None = None) -> dict:
    """Prune ``sm`` layer by layer into the checkpoint ``out_dir``, its weights written in
    ``save_dtype`` (default: the compute dtype); returns the report of ``prune_model`` plus
    ``streamed`` (bytes read and written, layer loads)."""
    from tqdm.auto import tqdm

    p = get_pruner(pruner)
    nm = parse_pattern(pattern)
    n = sm.num_layers
    sparsities = layer_targets(sparsities, n, nm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, save_dtype) if save_dtype else sm.dtype
    start = time.perf_counter()
    read0 = sm.bytes_read
    per_layer: dict[int, list] = {}
    for m in scored_matrices(sm.model):
        per_layer.setdefault(m.layer, []).append(m)
    inputs = None
    if p.stat is not None:
        if calib_sequences is None:
            raise UserError(f"pruner '{pruner}' needs calibration data")
        inputs = capture_layer_inputs(sm.model, calib_sequences, batch_size)
    report = {"pruner": pruner, "pattern": pattern, "matrices": [], "layers": []}
    weight_map: dict[str, str] = {}
    written = 0
    shards = n + 1
    for i in tqdm(range(n), desc=f"pruning ({pruner}, streamed)", unit="layer",
                  disable=not progress):
        layer = sm.load_layer(i)
        prune_layer(layer, i, per_layer[i], p, sparsities, nm, inputs, report)
        prefix = f"{sm.layer_prefix}.{i}."
        written += _write_shard(out, SHARD.format(i + 1, shards),
                                {prefix + k: v for k, v in _unique(layer.state_dict()).items()},
                                weight_map, target)
        if inputs is not None and i + 1 < n:
            inputs.hidden = [inputs.call(layer, i, b, hs) for b, hs in enumerate(inputs.hidden)]
        sm.free_layer(i)
    resident = {k: v for k, v in sm.model.state_dict().items()
                if not k.startswith(sm.layer_prefix + ".")}
    written += _write_shard(out, SHARD.format(shards, shards), _unique(resident), weight_map,
                            target)
    index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "model.safetensors").unlink(missing_ok=True)  # a single-file checkpoint of before
    config = sm.model.config
    compute, config.dtype = config.dtype, target
    config.save_pretrained(out)
    config.dtype = compute
    if sm.tokenizer is not None:
        sm.tokenizer.save_pretrained(out)
    finish_report(report, start)
    report["streamed"] = {"layer_loads": n, "checkpoint_bytes_read": sm.bytes_read - read0,
                          "bytes_written": written, "shards": shards}
    report["saved_dtype"] = str(target).replace("torch.", "")
    return report
