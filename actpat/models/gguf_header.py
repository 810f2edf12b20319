"""A GGUF file's header, read in a fraction of a second: its architecture and how long it must be.

``gguf.GGUFReader`` builds a numpy view of every field and tensor (30 s for a 0.5B model on a
slow CPU) and transformers reads the file the same way; both fail on a bad file only after that,
with a message about array shapes. Reading the header alone lets actpat refuse a corrupt or
truncated file, a non-causal model or an architecture transformers cannot load, in one line and
before anything is dequantised. The layout is GGUF v2/v3: magic, version, tensor count, key-value
count, the key-values, the tensor infos, then the tensor data at the next alignment boundary.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# value type -> struct format of one scalar (gguf.GGUFValueType numbering); 8 string, 9 array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# GGUF architectures of encoders and encoder-decoders: no AutoModelForCausalLM for them
NOT_CAUSAL = {"t5", "t5encoder", "umt5", "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2",
              "roberta", "modern-bert", "neo-bert", "clip", "wavtokenizer-dec"}


@dataclass
class GGUFHeader:
    architecture: str | None
    expected_bytes: int  # end of the last tensor's data
    tensors: int


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise EOFError
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise EOFError
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item in _SCALAR:  # skip the block of scalars at once
                self.pos += n * struct.calcsize(_SCALAR[item])
                if self.pos > len(self.data):
                    raise EOFError
                return None
            for _ in range(n):
                self.value(item)
            return None
        if kind not in _SCALAR:
            raise ValueError(f"unknown value type {kind}")
        return self.take(_SCALAR[kind])


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header; raise UserError when the file is not a complete GGUF file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(min(size, 64 << 20))  # headers hold the vocabulary: a few MB at most
    cur = _Cursor(data)
    try:
        if cur.take("<4s") != b"GGUF":
            raise ValueError("no GGUF magic number at its start")
        version = cur.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}, not 2 or 3")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        arch, alignment = None, 32
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            value = cur.value(cur.take("<I"))
            if key == "general.architecture" and isinstance(value, bytes):
                arch = value.decode("utf-8", "replace")
            elif key == "general.alignment" and isinstance(value, int):
                alignment = value
        end = 0
        for _ in range(n_tensors):
            cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            kind, offset = cur.take("<I"), cur.take("<Q")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * type_size)
        start = (cur.pos + alignment - 1) // alignment * alignment
    except EOFError:
        raise UserError(f"GGUF file {path} ends inside its header ({size} bytes): it is "
                        "truncated; download it again") from None
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"{path} is not a valid GGUF file ({e}); check the path or download "
                        "it again") from None
    header = GGUFHeader(arch, start + end, n_tensors)
    if size < header.expected_bytes:
        raise UserError(f"GGUF file {path} is truncated: {size} of {header.expected_bytes} "
                        "bytes; download it again")
    return header


def check_loadable(path: str | Path) -> GGUFHeader:
    """The header, once it is known to describe a causal LM that transformers can load."""
    header = read_header(path)
    arch = header.architecture
    if arch in NOT_CAUSAL:
        raise UserError(f"GGUF file {path} holds a '{arch}' model, not a causal language model; "
                        "give a decoder-only causal LM such as Llama, Mistral, Qwen2 or Gemma")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    def plain(name: str) -> str:  # "qwen2moe" is transformers' "qwen2_moe", "gpt-oss" "gpt_oss"
        return name.replace("_", "").replace("-", "")

    if arch is None or plain(arch) not in {plain(a) for a in GGUF_SUPPORTED_ARCHITECTURES}:
        raise UserError(f"GGUF file {path} has architecture '{arch}', which transformers cannot "
                        f"load from GGUF (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
                        "); convert the model to a Hugging Face directory and pass that")
    return header
