"""Architectures: where a causal LM keeps its decoder layers and which matrices are scored.

An *adapter* says where a causal LM keeps its decoder layers and which linear matrices of each
layer are scored, under canonical names (q, k, v, o, gate, up, down; fused ``qkv`` and
``gate_up`` where the architecture fuses them). Adding an architecture is one ``register_adapter``
entry. ``scored_matrices`` lists a model's scored matrices in a fixed order (layer by layer, the
adapter's canonical order); every part of actpat that walks the weights walks this list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..registry import Registry


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
            "add one with actpat.models.architectures.register_adapter"
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
