"""Independent slow references used by the tests: plain torch / transformers, one sample at a
time, nothing from actpat.

Modules are found here without actpat's adapter registry: the decoder layers are the model's
``nn.ModuleList`` with ``config.num_hidden_layers`` entries, and the scored matrices are every
``nn.Linear`` / ``Conv1D`` inside a layer, named by their path in the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# canonical matrix name of each module path suffix, written out per architecture family
CANONICAL = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "self_attn.out_proj": "o", "self_attn.qkv_proj": "qkv",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "mlp.gate_up_proj": "gate_up", "fc1": "up", "fc2": "down",
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down",
    "attention.query_key_value": "qkv", "attention.dense": "o",
    "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down",
}


def decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder layers: the list as long as the config says."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name.endswith(("layers", ".h"))]
    assert len(found) == 1, [f[0] for f in found]
    return found[0]


def linear_modules(model: nn.Module) -> dict[str, tuple[int, str, nn.Module]]:
    """name -> (layer index, canonical matrix, module) for every Linear / Conv1D of every layer."""
    prefix, layers = decoder_layer_list(model)
    out = {}
    for i, layer in enumerate(layers):
        for sub, m in layer.named_modules():
            if isinstance(m, (nn.Linear, Conv1D)):
                out[f"{prefix}.{i}.{sub}"] = (i, CANONICAL[sub], m)
    return out


def out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): Conv1D stores (in, out)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def autograd_activations(model, sequences, objective="max-logit"):
    """Mean over samples of |w * df(s)/dw|, one unpadded backward per sample, on the full model."""
    mats = {name: m for name, (_, _, m) in linear_modules(model).items()}
    sums = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in mats.items()}
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    for seq in sequences:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        if objective == "max-logit":
            f = logits[-1].max()
        else:
            logp = torch.log_softmax(logits[:-1].float(), -1)
            f = -logp.gather(-1, ids[0, 1:, None]).mean()
        f.backward()
        for name, m in mats.items():
            sums[name] += (m.weight.detach() * m.weight.grad).abs().float()
    model.zero_grad(set_to_none=True)
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return {k: v / len(sequences) for k, v in sums.items()}


def summed_then_abs(model, sequences):
    """The wrong shortcut: |w * d(sum_s f(s))/dw| / n. Tests show the metric differs from it."""
    mats = {name: m for name, (_, _, m) in linear_modules(model).items()}
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for seq in sequences:
        model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].max().backward()
    out = {name: (m.weight.detach() * m.weight.grad).abs() / len(sequences)
           for name, m in mats.items()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return out


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a||b| / (||a|| ||b||) in float64 (METHOD.md's pattern similarity)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a.abs() * b.abs()).sum() / (a.norm() * b.norm()))


def layer_cosines(model, a: dict, b: dict) -> list[float]:
    """Per-layer similarity of two activation maps (all of a layer's matrices concatenated)."""
    mods = linear_modules(model)
    n = model.config.num_hidden_layers
    return [abs_cosine(torch.cat([a[k].flatten() for k in a if mods[k][0] == i]),
                       torch.cat([b[k].flatten() for k in b if mods[k][0] == i]))
            for i in range(n)]


def matrix_cosines(model, a: dict, b: dict) -> dict[str, list[float]]:
    """canonical matrix -> per-layer similarity of that matrix alone."""
    out: dict[str, list[float]] = {}
    for k, (i, canon, _) in linear_modules(model).items():
        out.setdefault(canon, []).append(abs_cosine(a[k], b[k]))
    return out
