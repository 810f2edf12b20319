"""Saving a pruned model: a Hugging Face checkpoint plus ``actpat_prune.json``."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..runs import versions, write_json
from .layerwise import model_sparsity

PRUNE_RECORD = "actpat_prune.json"


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, record: dict) -> Path:
    """Write a Hugging Face checkpoint (safetensors, config without ``quantization_config``,
    tokenizer) and ``actpat_prune.json`` (``record`` plus the achieved sparsity)."""
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
