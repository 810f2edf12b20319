"""Saving a pruned model: a Hugging Face checkpoint plus ``actpat_prune.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..runs import versions, write_json
from .layerwise import model_sparsity

PRUNE_RECORD = "actpat_prune.json"


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def save_dtype(choice: str, stored: str | None, compute: str) -> str:
    """The dtype the pruned weights are written in: ``choice`` itself, or for ``auto`` the
    checkpoint's own dtype (``stored``; a bf16 model stays bf16 when pruned in float32), falling
    back to the compute dtype when the checkpoint does not say."""
    if choice == "auto":
        return stored or str(compute).replace("torch.", "")
    return choice


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, record: dict,
                dtype: str | None = None) -> Path:
    """Write a Hugging Face checkpoint (safetensors, config without ``quantization_config``,
    tokenizer) and ``actpat_prune.json`` (``record`` plus the achieved sparsity and
    ``saved_dtype``). ``dtype``: write the floating-point weights in this dtype (default: the
    model's own); the model in memory is left as it is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    saved_quant = config.__dict__.pop("quantization_config", None)
    compute = next(model.parameters()).dtype
    target = getattr(torch, dtype) if dtype else compute
    kwargs = {}
    if target != compute:  # cast a copy, tensor by tensor; a pruned zero stays zero
        kwargs["state_dict"] = _cast(model.state_dict(), target)
    try:
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    finally:
        if saved_quant is not None:
            config.quantization_config = saved_quant
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = str(target).replace("torch.", "")  # transformers writes the model's own
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = dict(record)
    record.setdefault("achieved_sparsity", model_sparsity(model))
    record["saved_dtype"] = str(target).replace("torch.", "")
    write_json(out / PRUNE_RECORD, record)
    return out


def _cast(state: dict, dtype: torch.dtype) -> dict:
    """``state`` with floating tensors in ``dtype``; tensors that shared storage (tied
    embeddings) still share it, so the checkpoint stores them once."""
    done, out = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in done:
            done[key] = v.to(dtype) if v.is_floating_point() else v
        out[k] = done[key]
    return out


def load_record(directory: str | Path) -> dict | None:
    """The ``actpat_prune.json`` of a pruned checkpoint, or None for other directories."""
    path = Path(directory) / PRUNE_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def prune_record(lm, pruner: str, pattern: str, allocation: dict, target: float, report: dict,
                 calibration: dict | None, *, seed: int = 0, dtype: str = "float32",
                 batch_size: int = 8, command: str | None = None) -> dict:
    """The ``actpat_prune.json`` record of a pruning run (``report``: from ``prune_model``)."""
    return {
        "model": lm.identity, "pruner": pruner, "pattern": pattern,
        "allocation": allocation, "target_sparsity": target,
        "layer_sparsities": [x["target"] for x in report["layers"]],
        "achieved_sparsity": report["achieved_sparsity"],
        "achieved_per_layer": [x["achieved"] for x in report["layers"]],
        "calibration": calibration,
        "seed": seed, "dtype": dtype, "batch_size": batch_size,
        "offload": report.get("offload"),
        "prune_seconds": report["seconds"], "total_seconds": None,
        "matrices": report["matrices"], "versions": versions(),
        "command": command,
    }
