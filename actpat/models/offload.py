"""Models larger than one device: load with accelerate's device map and CPU / disk offload.

``load_dispatched(spec, max_memory=...)`` loads a model with ``device_map="auto"``: accelerate
fills the GPUs up to their budget, then the CPU, then a disk folder, one whole decoder layer at
a time, and moves each offloaded layer's weights to the compute device only while it runs.
Profiling works unchanged on such a model: the metric's hooks keep a reference to the weight
that the forward pass used (the offload hook swaps the parameter out right after the layer ran).

``--max-memory`` reads as the budget of the compute device: a single size (``2GB``) limits the
first GPU (or, without a GPU, the CPU, with the rest going to disk), or a comma list
``cuda:0=20GiB,cpu=60GiB`` gives every device its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from .memory import available_ram, parse_size


def max_memory_map(text: str | None) -> dict | None:
    """``--max-memory`` as accelerate's ``max_memory`` dict (None: accelerate's own default)."""
    if not text:
        return None
    if "=" not in text:
        size = parse_size(text)
        if torch.cuda.is_available():
            return {0: size, "cpu": int(0.7 * available_ram())}
        return {"cpu": size}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if not value:
            raise UserError(f"cannot read --max-memory part '{part}': write e.g. cuda:0=20GiB")
        if name.startswith("cuda:"):
            key: int | str = int(name.split(":", 1)[1])
        elif name.isdigit():
            key = int(name)
        elif name in ("cpu", "disk"):
            key = name
        else:
            raise UserError(f"unknown device '{name}' in --max-memory: use cuda:N, cpu or disk")
        out[key] = parse_size(value)
    return out


def load_dispatched(spec: str, dtype: str = "float32", max_memory: str | None = None,
                    offload_dir: str | Path | None = None, trust_remote_code: bool = False):
    """Load ``spec`` (alias, .gguf, directory, hub id) dispatched over GPU / CPU / disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .architectures import get_adapter
    from .gguf_cache import gguf_to_safetensors
    from .loading import LoadedModel, parse_dtype, resolve_spec

    resolved = resolve_spec(spec)
    identity = {"spec": spec, "path": resolved}
    directory = resolved
    if resolved.endswith(".gguf"):
        if not Path(resolved).is_file():
            raise UserError(f"GGUF file not found: {resolved}; check the path")
        directory, identity["sha256"] = gguf_to_safetensors(resolved)
    offload_dir = str(offload_dir or tempfile.mkdtemp(prefix="actpat-offload-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
            device_map="auto", max_memory=max_memory_map(max_memory),
            offload_folder=offload_dir, offload_state_dict=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model '{spec}' with --device-map auto ({first}); check "
                        "the model and --max-memory") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    get_adapter(model)
    model.eval()
    identity["device_map"] = placement(model)
    return LoadedModel(model, tokenizer, spec, identity)


def placement(model) -> dict:
    """How many top-level modules of the device map sit on each device."""
    device_map = getattr(model, "hf_device_map", None) or {}
    out: dict[str, int] = {}
    for d in device_map.values():
        out[str(d)] = out.get(str(d), 0) + 1
    return out


# --------------------------------------------------------------------------- layer-wise offload


def _to(obj, device):
    """Tensors in (nested) args / kwargs moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class LayerOffload:
    """Keep a model in CPU memory and run each decoder layer on ``device`` when it is called.

    A forward pre-hook on every decoder layer moves that layer (and its inputs) onto the
    compute device and the previously active layer back to the CPU, so at most one decoder
    layer's weights sit on the device: the shape of the sequential pruning loop, which calls
    layer i for all calibration batches, prunes it, then moves on. Calls through a
    monkey-patched instance ``forward`` (the pruning module's input capture, which never runs
    the layer's real computation) leave the layer where it is. Use as a context manager; on
    exit every layer is back on the CPU.
    """

    def __init__(self, model, device: torch.device | str, offload_device: str = "cpu"):
        from .architectures import decoder_layers

        self.layers = list(decoder_layers(model))
        self.device = torch.device(device)
        self.offload = torch.device(offload_device)
        self.active: int | None = None
        self.moves: list[int] = []  # layer indices in the order they came onto the device
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            layer.to(self.offload)
            self.handles.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, i):
        def hook(module, args, kwargs):
            if "forward" in module.__dict__:  # a capture stub stands in for the layer
                return None
            if self.active != i:
                if self.active is not None:
                    self.layers[self.active].to(self.offload)
                module.to(self.device)
                self.active = i
                self.moves.append(i)
            return _to(args, self.device), _to(kwargs, self.device)

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.active is not None:
            self.layers[self.active].to(self.offload)
            self.active = None
