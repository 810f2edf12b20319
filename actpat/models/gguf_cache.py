"""The dequantised GGUF cache: a GGUF file turned once into a float32 Hugging Face directory.

transformers dequantises a GGUF file to float32 on every load (~20-35 s for 135M, minutes for
a few billion parameters), so the first load writes a float32 safetensors copy under the cache
dir, keyed by the file's hash; later loads read that copy (about a second). An entry is written
in a temporary folder and renamed into place whole, and is trusted only when every file it lists
is there at its recorded size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..runs import cache_dir, file_hash
from .gguf_header import check_loadable


def gguf_to_safetensors(gguf_path: str) -> tuple[str, str]:
    """Dequantise a GGUF file once into a float32 HF directory under the cache; return its path.

    The entry is written in a temporary folder and renamed into place whole; ``actpat_source.json``,
    written last, lists every file's size, and an entry whose files do not match it is rebuilt."""
    digest = file_hash(gguf_path)
    target = cache_dir() / "gguf" / digest[:32]
    if _cache_entry_ok(target):
        return str(target), digest
    check_loadable(gguf_path)  # one line for a corrupt, truncated or unloadable file, in a second
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                     dtype=torch.float32)
    except Exception as e:  # transformers' GGUF reader raises many kinds; all mean "this file"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"transformers cannot load GGUF file {gguf_path} ({first}); convert it "
                        "to a Hugging Face directory and pass that") from None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # GGUF-loaded configs make save_pretrained refuse
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied lm_head
    tokenizer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf_path, "sha256": digest,
                                               "files": files}))
    if target.exists():  # an invalid entry, or another process finished first
        if _cache_entry_ok(target):
            shutil.rmtree(tmp)
            return str(target), digest
        shutil.rmtree(target)
    tmp.replace(target)
    return str(target), digest


SOURCE_FILE = "actpat_source.json"


def _cache_entry_ok(target: Path) -> bool:
    """Whether a dequantised cache entry is complete: every file it lists, at its size."""
    try:
        files = json.loads((target / SOURCE_FILE).read_text())["files"]
        return "model.safetensors" in files and all(
            (target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
