"""Models larger than memory: a model skeleton whose decoder layers live on disk.

``open_streamed(spec)`` builds the model on the ``meta`` device (accelerate's
``init_empty_weights``: no weight memory), loads only the parameters outside the decoder layers
(embeddings, final norm, LM head) and leaves every decoder layer's weights in the checkpoint's
safetensors files. ``StreamedModel.load_layer(i)`` materialises layer i (read through a
memory map that is opened for that read and closed again, so no page of the checkpoint stays
mapped into the process) in the compute dtype; ``free_layer(i)`` puts it back on ``meta``. The
engines built on it (``activation.streaming``, ``sparsity.streamed``, ``evaluation.streamed``)
hold one decoder layer at a time, so their peak memory is set by the largest layer, not by the
number of layers.

Running pieces of the model uses *stand-ins*: each decoder layer's instance ``forward`` is
replaced by a function that never touches the layer's weights (the mechanism of
``sparsity.layerwise.capture_layer_inputs``). ``capture`` runs the model's own code up to the
first layer and records the arguments every layer receives (its attention mask and position
embeddings: what the model computes for these inputs, padding included); ``head`` runs the
model's own code above the last layer (final norm, LM head) on given final hidden states.

The memory budget (``plan_budget``): one decoder layer in the compute dtype, plus what the
engine keeps per layer (a float32 accumulator while profiling), plus the resident parts
(embeddings and LM head), plus per-sample working memory, must fit; the process's fixed
overhead (Python, torch, tokenizer) is measured, not predicted.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .architectures import decoder_layers, get_adapter
from .gguf_cache import gguf_to_safetensors
from .loading import LoadedModel, parse_dtype, resolve_spec, stored_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
          "BOOL": 1}


class _Stop(Exception):
    pass


def checkpoint_directory(spec: str) -> tuple[str, dict]:
    """A local safetensors directory for ``spec`` (alias / .gguf via the cached copy)."""
    resolved = resolve_spec(spec)
    identity = {"spec": spec, "path": resolved}
    if resolved.endswith(".gguf"):
        if not Path(resolved).is_file():
            raise UserError(f"GGUF file not found: {resolved}; check the path")
        directory, identity["sha256"] = gguf_to_safetensors(resolved)
        return directory, identity
    d = Path(resolved)
    if not d.is_dir() or not ((d / INDEX_FILE).exists() or (d / SINGLE_FILE).exists()):
        raise UserError(f"--stream-layers needs a local directory with safetensors weights "
                        f"({SINGLE_FILE} or {INDEX_FILE}), an alias or a .gguf file; "
                        f"'{spec}' is none of these (download a hub model first)")
    return str(d), identity


def weight_map(directory: str | Path) -> dict[str, str]:
    """Tensor name -> file name of a safetensors checkpoint (single file or sharded)."""
    d = Path(directory)
    if (d / INDEX_FILE).exists():
        return dict(json.loads((d / INDEX_FILE).read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(d / SINGLE_FILE), "pt") as f:
        return {k: SINGLE_FILE for k in f.keys()}


def tensor_sizes(directory: str | Path) -> dict[str, tuple[list[int], int]]:
    """Tensor name -> (shape, bytes on disk), from the safetensors headers only."""
    import struct

    out = {}
    for name in sorted(set(weight_map(directory).values())):
        with open(Path(directory) / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for s in v["shape"]:
                    count *= s
                out[k] = (v["shape"], count * _BYTES.get(v["dtype"], 4))
    return out


@dataclass
class StreamedModel:
    """A causal LM on ``meta`` with resident embeddings / head and decoder layers on disk."""

    model: nn.Module
    tokenizer: object
    spec: str
    identity: dict
    directory: str
    dtype: torch.dtype
    files: dict[str, str]  # tensor name in the model -> file
    layer_prefix: str  # e.g. "model.layers"
    source: dict[str, str] = field(default_factory=dict)  # model name -> name in the file
    streamed = True  # what ``activation.cache.profile_run`` dispatches on
    bytes_read: int = 0  # tensor bytes read from the checkpoint so far
    layers_loaded: int = 0
    loaded: set = field(default_factory=set)

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_keys(self, i: int) -> list[str]:
        prefix = f"{self.layer_prefix}.{i}."
        return [k for k in self.files if k.startswith(prefix)]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, read from their files (each file mapped only while it is read)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(str(Path(self.directory) / name), "pt") as f:
                for k in ks:
                    t = f.get_tensor(self.source.get(k, k))
                    self.bytes_read += t.numel() * t.element_size()
                    out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer i with its weights in memory (compute dtype)."""
        layer = self.layers[i]
        if i in self.loaded:
            return layer
        prefix = f"{self.layer_prefix}.{i}."
        state = {k[len(prefix):]: v for k, v in self.read(self.layer_keys(i)).items()}
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if unexpected or any(_is_meta(layer.get_parameter(m)) for m in missing
                             if _has_param(layer, m)):
            raise UserError(f"{self.directory}: layer {i}'s tensors do not match the model "
                            f"(missing {missing[:2]}, unexpected {unexpected[:2]}); the "
                            "checkpoint and its config.json disagree")
        self.loaded.add(i)
        self.layers_loaded += 1
        return layer

    def free_layer(self, i: int) -> None:
        """Layer i back on ``meta``: its weight memory is released."""
        if i in self.loaded:
            self.layers[i].to("meta")
            self.loaded.discard(i)
            _trim()

    # ------------------------------------------------------------------ stand-ins

    @contextmanager
    def stand_ins(self, make):
        """Every decoder layer's ``forward`` replaced by ``make(i)`` for the block's duration."""
        layers = self.layers
        saved = [layer.__dict__.get("forward") for layer in layers]
        for i, layer in enumerate(layers):
            layer.forward = make(i)
        try:
            yield
        finally:
            for layer, old in zip(layers, saved):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old

    @torch.no_grad()
    def capture(self, **inputs) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """Layer 0's input hidden states for ``inputs`` and every layer's other arguments."""
        n = self.num_layers
        calls: dict[int, tuple] = {}
        first: list[torch.Tensor] = []

        def make(i):
            def forward(*args, **kwargs):
                hs = args[0] if args else kwargs.pop("hidden_states")
                calls[i] = (tuple(args[1:]), dict(kwargs))
                if i == 0:
                    first.append(hs.detach())
                if i == n - 1:
                    raise _Stop
                return hs
            return forward

        with self.stand_ins(make):
            try:
                self.model(**inputs, use_cache=False)
            except _Stop:
                pass
        return first[0], [calls[i] for i in range(n)]

    @contextmanager
    def head(self, final: torch.Tensor, tuple_out: bool):
        """Inside the block, calling the model runs only its code above the decoder layers, on
        the final hidden states ``final`` (the layers pass their input through; the last one
        hands on ``final``). ``tuple_out``: whether the real layers return tuples."""
        n = self.num_layers

        def make(i):
            def forward(*args, **kwargs):
                hs = final if i == n - 1 else (args[0] if args else kwargs["hidden_states"])
                return (hs,) if tuple_out else hs
            return forward

        with self.stand_ins(make):
            yield self.model

    def as_loaded(self) -> LoadedModel:
        return LoadedModel(self.model, self.tokenizer, self.spec, self.identity)


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed blocks below its mmap
    threshold, up to 32 MB, in the heap: without this, small layers would make the resident
    memory creep up layer after layer)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def _model_names(model: nn.Module, files: dict[str, str]):
    """Checkpoint names -> the model's names, through transformers' plain key renamings
    (``embed_out.`` -> ``lm_head.`` for GPT-NeoX and the like)."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        renames = [(src, t.target_patterns[0]) for t in get_model_conversion_mapping(model)
                   if type(t).__name__ == "WeightRenaming" for src in t.source_patterns]
    except Exception:  # an older transformers: names are used as stored
        renames = []
    known = set(model.state_dict())
    out, source = {}, {}
    for key, file in files.items():
        name = key
        if name not in known:
            for src, dst in renames:
                new = re.sub(src, dst, name)
                if new in known:
                    name = new
                    break
        out[name] = file
        if name != key:
            source[name] = key
    return out, source


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]):
    """Run a decoder layer on ``hidden`` with its recorded arguments; (output, was_tuple)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        return out[0], True
    return out, False


@torch.no_grad()
def run_layers(sm: "StreamedModel", inputs: list[dict], each=None
               ) -> tuple[list[torch.Tensor], bool]:
    """Each batch's last-layer output (and whether layers return tuples), every decoder layer
    read once for all batches; ``inputs``: the model's keyword inputs per batch; ``each(i, b,
    hidden)``, if given, sees batch b's output of layer i."""
    caught = [sm.capture(**x) for x in inputs]
    hidden = [h for h, _ in caught]
    tuple_out = False
    for i in range(sm.num_layers):
        layer = sm.load_layer(i)
        for b, (_, calls) in enumerate(caught):
            hidden[b], tuple_out = call_layer(layer, hidden[b], calls[i])
            if each is not None:
                each(i, b, hidden[b])
        sm.free_layer(i)
    return hidden, tuple_out


def open_streamed(spec: str, dtype: str | torch.dtype = "float32",
                  trust_remote_code: bool = False) -> StreamedModel:
    """The model of ``spec`` with only its non-layer parameters in memory (see module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, identity = checkpoint_directory(spec)
    identity["stored_dtype"] = stored_dtype(directory)
    torch_dtype = parse_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open model '{spec}' for streaming ({first}); check the "
                        "directory") from None
    config.dtype = torch_dtype
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) are real
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=torch_dtype)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    adapter = get_adapter(model)
    files, source = _model_names(model, weight_map(directory))
    sm = StreamedModel(model, tokenizer, spec, identity, directory, torch_dtype, files,
                       adapter.layers, source)
    resident = [k for k in files if not k.startswith(adapter.layers + ".")]
    state = sm.read(resident)
    model.load_state_dict(state, strict=False, assign=True)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None:  # tied embeddings: the checkpoint stores one of the two
        if _is_meta(out_emb.weight) and not _is_meta(in_emb.weight):
            out_emb.weight = in_emb.weight
        elif _is_meta(in_emb.weight) and not _is_meta(out_emb.weight):
            in_emb.weight = out_emb.weight
    layer_ids = {id(p) for p in decoder_layers(model).parameters()}
    left = [n for n, p in model.named_parameters() if _is_meta(p) and id(p) not in layer_ids]
    if left:
        raise UserError(f"{directory}: no weights for {left[:3]} in the checkpoint; the "
                        "checkpoint and its config.json disagree")
    identity["streamed"] = True
    return sm


# --------------------------------------------------------------------------- budgets


@dataclass
class Footprint:
    """Bytes of a checkpoint, split into what stays resident and what one layer takes."""

    resident: int  # embeddings, final norm, LM head, in the compute dtype
    layer: int  # the largest decoder layer, in the compute dtype
    layers: int  # number of decoder layers
    scored_layer: int  # weights of the scored matrices of the largest layer
    scored_total: int  # weights of all scored matrices
    params: int  # all parameters
    hidden: int  # hidden size
    largest_matrix: int  # weights of the largest scored matrix


def footprint(sm_or_dir, dtype: torch.dtype, layer_prefix: str = "model.layers",
              scored_suffixes: tuple[str, ...] | None = None) -> Footprint:
    """Sizes from the safetensors headers (nothing is read beyond them)."""
    directory = sm_or_dir.directory if isinstance(sm_or_dir, StreamedModel) else sm_or_dir
    sizes = tensor_sizes(directory)
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer: dict[int, int] = {}
    scored: dict[int, int] = {}
    resident = params = largest = hidden = 0
    for k, (shape, _) in sizes.items():
        count = 1
        for s in shape:
            count *= s
        params += count
        if k.startswith(layer_prefix + "."):
            i = int(k[len(layer_prefix) + 1:].split(".", 1)[0])
            per_layer[i] = per_layer.get(i, 0) + count
            if len(shape) == 2 and (scored_suffixes is None or k.endswith(scored_suffixes)):
                scored[i] = scored.get(i, 0) + count
                largest = max(largest, count)
                hidden = max(hidden, min(shape))
        else:
            resident += count
    n = len(per_layer)
    return Footprint(resident * elem, max(per_layer.values(), default=0) * elem, n,
                     max(scored.values(), default=0), sum(scored.values()), params, hidden,
                     largest)


def scored_suffixes(model: nn.Module) -> tuple[str, ...]:
    return tuple("." + path + ".weight" for path in get_adapter(model).matrices.values())


def in_memory_need(fp: Footprint, dtype: torch.dtype, profile: bool) -> int:
    """Bytes the in-memory engine needs: the whole model, plus float32 maps when profiling."""
    model = fp.resident + fp.layers * fp.layer
    return model + (4 * fp.scored_total if profile else 0) + int(0.1 * model)


def streamed_need(fp: Footprint, batch: int, tokens: int, profile: bool) -> int:
    """Bytes the streamed engine needs beyond the fixed overhead, for ``batch`` x ``tokens``.

    One layer in the compute dtype (twice: the next one is read while the last is freed) and
    the resident parts; when profiling, the layer's float32 accumulator and, per sample, the
    largest matrix's |G_b| and its product with |W| (float32) plus a layer's activations.
    """
    need = fp.resident + 2 * fp.layer
    act = batch * tokens * fp.hidden * 4 * 24  # a layer's saved activations (a generous bound)
    if profile:
        need += 4 * fp.scored_layer + batch * fp.largest_matrix * 4 * 2 + 4 * fp.largest_matrix
        need += act
    else:
        need += act // 4
    return need


def choose_engine(spec: str, dtype: str, stream: bool, budget: int | None,
                  profile: bool) -> tuple[bool, str | None]:
    """(stream?, why): ``--stream-layers``, or a budget the in-memory engine would exceed."""
    if stream:
        return True, "--stream-layers"
    if budget is None:
        return False, None
    try:
        directory, _ = checkpoint_directory(spec)
    except UserError:
        return False, None  # a hub id: the in-memory engine (download it to stream it)
    from .loading import parse_dtype as _pd

    torch_dtype = _pd(dtype)
    fp = footprint(directory, torch_dtype)
    need = in_memory_need(fp, torch_dtype, profile)
    if need > budget:
        return True, (f"the model{' and its float32 maps need' if profile else ' needs'} about "
                      f"{need / 1e9:.1f} GB, more than --max-memory {budget / 1e9:.1f} GB: "
                      "streaming decoder layers from disk")
    return False, None


# --------------------------------------------------------------------------- writing

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """A safetensors file written tensor by tensor (``safetensors.torch.save_file`` first
    builds the whole file in memory: one more copy of a layer). Atomic: written to
    ``path.tmp``, then renamed. Returns the bytes of tensor data."""
    import os
    import struct

    path = Path(path)
    header, at = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + n]}
        at += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            flat = t.detach().contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
    os.replace(tmp, path)
    return at
