"""The layer-streamed profile: the exact per-sample metric with one decoder layer in memory.

For each group of batches (``profile_streamed``; ``GROUP_BATCHES`` batches per group):

1. *capture*: the model's own code runs up to the first decoder layer (``StreamedModel
   .capture``): each batch's layer-0 input and every layer's other arguments (mask, position
   embeddings);
2. *forward*: layer by layer, each loaded from disk once, run without grad on every batch and
   freed; only each layer's input hidden states are kept (spilled to scratch files, so memory
   does not grow with the number of layers);
3. *top*: the objective of ``activation.metric`` on each batch's final hidden states (``head``:
   final norm and LM head, resident) gives the gradient at the top;
4. *walk down*: from the last layer to the first, load layer i and its float32 accumulator (a
   ``MeanAccumulator``, ``RUN/stream/acc-<i>.safetensors``) once; for each batch in order
   recompute the layer's forward from its stored input with grad enabled and back-propagate the
   batch's incoming gradient, while the very hooks of ``activation.metric`` (``_Hooks``) add
   per-sample |W| * |G_b| into the accumulator; write it back (atomic rename), free the layer,
   and pass the gradients at the layer's input on down.

Batches are added in the in-memory engine's order, so the sums are those of
``profiling.compute_profile`` up to the order of autograd's own accumulations. So the backward pass costs one extra forward per layer (the recompute). Every accumulator
file records how many samples it holds; ``stream/state.json`` records the batches that are
complete. The same command after a kill resumes at the first incomplete group with the same
batch boundaries; layers whose accumulator already holds that group still pass the gradients
on but add nothing, so the resumed profile is bit-identical to an uninterrupted one (the
accumulators are the checkpoint: ``--checkpoint-every`` does not apply).

At the end the mean maps are written into ``profile.safetensors`` layer by layer at offsets
fixed in advance (a standard safetensors file, read by ``Profile.load``); each accumulator file
is deleted once its layer is written, so the disk holds about one map, not two.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import UserError
from ..models.architectures import scored_matrices
from ..models.streamed import StreamedModel, call_layer, write_safetensors
from ..runs import versions, write_json
from ..version import __version__
from .metric import MeanAccumulator, _Hooks, get_objective, pad_batch
from .profiling import PROFILE_FILE, SUMMARY_FILE, Profile

STREAM_DIR = "stream"
GROUP_BATCHES = 8  # batches per walk: each layer and its accumulator are read once per group


class StreamedProfile(Profile):
    """A profile whose tensors are already in ``profile.safetensors``; ``save`` writes the
    summary only (the maps are not loaded: for a large model they exceed memory)."""

    def save(self, run_dir) -> None:
        write_json(Path(run_dir) / SUMMARY_FILE, dict(self.meta, modules=self.meta_modules))


def _io_read_bytes() -> int | None:
    try:
        text = Path("/proc/self/io").read_text()
        return int(text.split("read_bytes:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


class Scratch:
    """Scratch files for the layer inputs of a group of batches (one file per layer and
    batch), so that memory does not grow with the number of layers."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def hidden_path(self, i: int, b: int) -> Path:
        return self.dir / f"hidden-{i:05d}-{b:03d}.safetensors"

    def put_hidden(self, i: int, b: int, h: torch.Tensor) -> None:
        write_safetensors(self.hidden_path(i, b), {"h": h})

    def get_hidden(self, i: int, b: int) -> torch.Tensor:
        return load_file(str(self.hidden_path(i, b)))["h"]

    def clear(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


class _Store(Scratch):
    """The run's streamed state: per-layer accumulators, scratch hidden states, the cursor."""

    def __init__(self, run_dir: Path, key: str, batch_size: int, samples: int, group: int):
        super().__init__(run_dir / STREAM_DIR)
        self.key = key
        self.state_path = self.dir / "state.json"
        state = {}
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("key") != key:
                raise UserError(f"{self.dir} holds the state of a different profile (other "
                                "model, data, sampling or options); delete it or choose "
                                "another --out")
        self.state = {"key": key, "batch_size": state.get("batch_size", batch_size),
                      "group": state.get("group", group),
                      "samples": samples, "cursor": state.get("cursor", 0),
                      "count": state.get("count", 0), "tokens": state.get("tokens", 0),
                      "assembling": state.get("assembling", False)}
        self.resumed_at = self.state["cursor"] if state else None

    def save_state(self) -> None:
        write_json(self.state_path, self.state)

    def acc_path(self, i: int) -> Path:
        return self.dir / f"acc-{i:05d}.safetensors"

    def acc_cursor(self, i: int) -> int:
        p = self.acc_path(i)
        if not p.exists():
            return 0
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != self.key:
            raise UserError(f"{p} belongs to another profile; delete {self.dir} to start over")
        return int(meta["cursor"])

    def load_acc(self, i: int) -> dict[str, torch.Tensor]:
        p = self.acc_path(i)
        return load_file(str(p)) if p.exists() else {}

    def save_acc(self, i: int, sums: dict[str, torch.Tensor], cursor: int) -> None:
        write_safetensors(self.acc_path(i), sums, {"key": self.key, "cursor": str(cursor)})

@torch.no_grad()
def _forward_layers(sm: StreamedModel, store: Scratch, hidden: list, calls: list) -> tuple:
    """Run every layer on each batch's hidden states, storing each layer's inputs (one file
    per layer and batch); the final hidden states of every batch."""
    tuple_out = False
    for i in range(sm.num_layers):
        layer = sm.load_layer(i)
        for b in range(len(hidden)):
            store.put_hidden(i, b, hidden[b])
            hidden[b], tuple_out = call_layer(layer, hidden[b], calls[b][i])
        sm.free_layer(i)
    return hidden, tuple_out


def walk_group(sm: StreamedModel, scratch: Scratch, batches, objective, visit
               ) -> list[torch.Tensor]:
    """A group of (ids, mask) batches: capture, forward, top gradients, then one walk down in
    which each layer is read once and every batch, in order, recomputes it and back-propagates
    while the hooks of ``activation.metric`` hand per-sample activations to sinks.

    ``visit(i)`` -> (matrices of layer i to score, ``sinks(b)`` for batch b, ``done()`` called
    after the layer). Returns each batch's objective values."""
    fn = get_objective(objective) if isinstance(objective, str) else objective
    caught = [sm.capture(input_ids=ids, attention_mask=mask) for ids, mask in batches]
    calls = [c for _, c in caught]
    finals, tuple_out = _forward_layers(sm, scratch, [h for h, _ in caught], calls)
    del caught
    grads, values = [], []
    for (ids, mask), final in zip(batches, finals):
        final = final.detach().requires_grad_(True)
        with torch.enable_grad(), sm.head(final, tuple_out) as model:
            v = fn(model, ids, mask)
            v.sum().backward()
        grads.append(final.grad)
        values.append(v.detach())
    del finals
    masks = [(mask.to(torch.float32), bool((mask == 0).any())) for _, mask in batches]
    for i in reversed(range(sm.num_layers)):
        mats, sinks, done = visit(i)
        layer = sm.load_layer(i)
        for b in range(len(batches)):
            h = scratch.get_hidden(i, b).requires_grad_(True)
            with _Hooks(mats, sinks(b)) as hooks, torch.enable_grad():
                hooks.token_mask, hooks.padded = masks[b]
                out, _ = call_layer(layer, h, calls[b][i])
                out.backward(grads[b])
            grads[b] = h.grad
            del out, h
        sm.free_layer(i)
        done()
    return values


def _score_group_streamed(sm: StreamedModel, store: _Store, mats_by_layer, batches,
                          objective, group_end: int) -> list[torch.Tensor]:
    """A group of batches added into the per-layer accumulators on disk; a layer whose
    accumulator already holds the group (resumed) passes the gradients on but adds nothing."""

    def visit(i):
        if store.acc_cursor(i) >= group_end:
            return [], lambda b: [], lambda: None
        acc = MeanAccumulator()
        acc.sums = store.load_acc(i)
        return mats_by_layer[i], lambda b: [acc], lambda: store.save_acc(i, acc.sums, group_end)

    return walk_group(sm, store, batches, objective, visit)


def _write_header(path: Path, entries: list[tuple[str, list[int]]]) -> dict[str, int]:
    """A safetensors file of float32 tensors, sized in advance; name -> data offset."""
    header, offsets, at = {}, {}, 0
    for name, shape in entries:
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + n]}
        offsets[name] = at
        at += n
    header["__metadata__"] = {"format": "actpat-profile", "version": __version__}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    if not path.exists() or path.stat().st_size != base + at:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            f.truncate(base + at)
    return {k: base + v for k, v in offsets.items()}


def _assemble(sm: StreamedModel, store: _Store, run_dir: Path, mats) -> None:
    """Mean maps into ``profile.safetensors``, one layer at a time (resumable)."""
    store.state["assembling"] = True
    store.save_state()
    tmp = run_dir / (PROFILE_FILE + ".tmp")
    shapes = [(m.name, list(m.module.weight.shape)) for m in mats]
    offsets = _write_header(tmp, shapes)
    count = max(store.state["count"], 1)
    fd = os.open(tmp, os.O_RDWR)
    try:
        for i in range(sm.num_layers):
            p = store.acc_path(i)
            if not p.exists():
                continue  # written by an interrupted assembly before
            sums = load_file(str(p))
            for name, t in sums.items():
                mean = (t / count).contiguous()
                if not torch.isfinite(mean).all():
                    raise UserError(f"non-finite activations in {name} (overflow in the "
                                    "model's dtype?); use --dtype float32")
                os.pwrite(fd, mean.numpy().tobytes(), offsets[name])
            os.fsync(fd)
            del sums
            p.unlink()
    finally:
        os.close(fd)
    os.replace(tmp, run_dir / PROFILE_FILE)


def profile_streamed(sm: StreamedModel, sequences: list[list[int]], run_dir, key: str,
                     batch_size: int | str = 4, objective: str = "max-logit",
                     meta: dict | None = None, progress: bool = True,
                     max_memory: int | None = None, group: int | None = None
                     ) -> StreamedProfile:
    """The mean activation map of ``sequences``, streamed; written to ``run_dir``.

    ``batch_size``: an int or ``"auto"`` (the largest that ``models.streamed.streamed_need``
    says fits ``max_memory`` next to the measured current footprint). Returns a
    ``StreamedProfile`` whose ``save`` writes the summary (the tensors are on disk).
    """
    from tqdm.auto import tqdm

    from ..models.memory import current_rss, default_budget
    from ..models.streamed import footprint, scored_suffixes, streamed_need

    run_dir = Path(run_dir)
    if batch_size == "auto":
        fp = footprint(sm, sm.dtype, sm.layer_prefix, scored_suffixes(sm.model))
        budget = max_memory if max_memory is not None else default_budget("cpu")
        tokens = max(len(s) for s in sequences)
        batch_size = 1
        while batch_size < 64 and current_rss() + streamed_need(
                fp, batch_size * 2, tokens, True) <= budget:
            batch_size *= 2
    store = _Store(run_dir, key, batch_size, len(sequences), group or GROUP_BATCHES)
    batch_size, group = store.state["batch_size"], store.state["group"]
    for p in sm.model.parameters():
        p.requires_grad_(False)
    mats = scored_matrices(sm.model)
    by_layer: dict[int, list] = {}
    for m in mats:
        by_layer.setdefault(m.layer, []).append(m)
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    io0, read0, loads0 = _io_read_bytes(), sm.bytes_read, sm.layers_loaded
    start = time.perf_counter()
    cursor = store.state["cursor"]
    bar = tqdm(total=len(sequences), initial=cursor, desc="profiling (streamed)", unit="sample",
               disable=not progress)
    batches = 0
    while cursor < len(sequences) and not store.state["assembling"]:
        chunks = [sequences[c:c + batch_size] for c in
                  range(cursor, min(cursor + batch_size * group, len(sequences)), batch_size)]
        size = sum(len(c) for c in chunks)
        values = _score_group_streamed(sm, store, by_layer, [pad_batch(c, pad) for c in chunks],
                                       objective, cursor + size)
        if not all(torch.isfinite(v).all() for v in values):
            raise UserError("the objective is not finite (overflow?); use --dtype float32")
        cursor += size
        batches += len(chunks)
        store.state.update(cursor=cursor, count=store.state["count"] + size,
                           tokens=store.state["tokens"] + sum(len(x) for c in chunks for x in c))
        store.save_state()
        bar.update(size)
    bar.close()
    scored_s = time.perf_counter() - start
    _assemble(sm, store, run_dir, mats)
    wall = time.perf_counter() - start
    io1 = _io_read_bytes()
    info = dict(meta or {})
    info.update(objective=objective, samples=len(sequences), tokens_scored=store.state["tokens"],
                batch_size=batch_size, wall_time_s=round(wall, 3), versions=versions())
    info["streamed"] = {
        "engine": "layer-streamed", "batches_this_run": batches, "batches_per_walk": group,
        "scoring_s": round(scored_s, 3),
        "layer_loads": sm.layers_loaded - loads0,
        "checkpoint_bytes_read": sm.bytes_read - read0,
        "disk_read_bytes": None if io0 is None or io1 is None else io1 - io0,
        "max_memory": max_memory,
    }
    if store.resumed_at is not None:
        info["resumed_at_sample"] = store.resumed_at
    store.clear()
    prof = StreamedProfile({}, {m.name: m.layer for m in mats},
                           {m.name: m.matrix for m in mats}, info)
    prof.meta_modules = [{"name": m.name, "layer": m.layer, "matrix": m.matrix,
                          "shape": list(m.module.weight.shape)} for m in mats]
    return prof
