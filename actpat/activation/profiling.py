"""Profiles: a dataset's mean activation map per scored matrix, counts at gamma, save/load.

On disk a profile is a run directory holding
  * ``profile.safetensors``: one float32 tensor per scored matrix, keyed by the module's name
    in the model (``model.layers.0.self_attn.q_proj``), shaped like its weight;
  * ``summary.json``: model, dataset, split, data source, samples, seq len, objective, seed,
    tokens scored, wall time, package versions, and the layer / matrix type of every key.

``counts`` turns a map into the paper's N_i: weights whose mean activation exceeds gamma, per
decoder layer and per matrix type. gamma is absolute (``gamma``) or set so that a given fraction
of all scored weights lies above it (``gamma_quantile``), which transfers across model sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..version import __version__
from ..errors import UserError
from ..runs import versions, write_json
from .metric import MeanAccumulator, pad_batch, score_batch
from ..models.architectures import scored_matrices
from ..models.loading import LoadedModel

PROFILE_FILE = "profile.safetensors"
SUMMARY_FILE = "summary.json"


@dataclass
class Profile:
    maps: dict[str, torch.Tensor]  # module name -> mean A(s, w), float32, weight's shape
    layers: dict[str, int]  # module name -> decoder layer index
    matrices: dict[str, str]  # module name -> canonical matrix type (q, k, v, o, gate, up, down)
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return max(self.layers.values()) + 1

    @property
    def matrix_types(self) -> list[str]:
        return list(dict.fromkeys(self.matrices[k] for k in self.maps))

    def layer_vector(self, layer: int) -> torch.Tensor:
        """The layer's scored matrices flattened and concatenated, in canonical order."""
        return torch.cat([v.flatten() for k, v in self.maps.items() if self.layers[k] == layer])

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        modules = [{"name": k, "layer": self.layers[k], "matrix": self.matrices[k],
                    "shape": list(v.shape)} for k, v in self.maps.items()]
        summary = dict(self.meta, modules=modules)
        tmp = run_dir / (PROFILE_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.maps.items()}, str(tmp),
                  metadata={"format": "actpat-profile", "version": __version__})
        tmp.replace(run_dir / PROFILE_FILE)  # never a half-written profile under the real name
        write_json(run_dir / SUMMARY_FILE, summary)

    @classmethod
    def load(cls, run_dir: str | Path) -> "Profile":
        run_dir = Path(run_dir)
        if not (run_dir / PROFILE_FILE).exists():
            raise UserError(f"{run_dir} holds no {PROFILE_FILE}; run `actpat profile --out "
                            f"{run_dir}` first")
        try:
            maps = load_file(str(run_dir / PROFILE_FILE))
            summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{run_dir / PROFILE_FILE} is corrupt or truncated ({e}); "
                            "re-run `actpat profile` for it") from None
        modules = summary.pop("modules")
        order = [m["name"] for m in modules]
        if set(order) != set(maps):
            raise UserError(f"{run_dir}: profile tensors and {SUMMARY_FILE} disagree; "
                            "re-run `actpat profile` for it")
        return cls({k: maps[k] for k in order}, {m["name"]: m["layer"] for m in modules},
                   {m["name"]: m["matrix"] for m in modules}, summary)


# --------------------------------------------------------------------------- computing


def compute_profile(
    lm: LoadedModel,
    sequences: list[list[int]],
    batch_size: int | str = 4,
    objective: str = "max-logit",
    meta: dict | None = None,
    progress: bool = True,
    *,
    checkpoint=None,
    dist=None,
    max_memory: int | None = None,
) -> Profile:
    """Mean activation map of ``sequences`` (right-padded batches, exact per-sample metric).

    ``batch_size``: an int, or ``"auto"`` (the largest batch that fits ``max_memory`` bytes,
    default a safe share of free memory; see ``actpat.memory``). An out-of-memory error halves
    the batch and retries it; no sample is lost or counted twice. ``checkpoint``: an
    ``actpat.checkpointing.Checkpointer``; the loop resumes from its state and saves every
    ``checkpoint.every`` samples. ``dist``: an ``distributed.Ranks`` (default: the
    environment's); each rank scores its shard and the float32 sums are all-reduced, so every
    rank returns the whole profile.
    """
    from tqdm.auto import tqdm

    from .checkpoint import LoopState
    from .distributed import all_reduce_number, all_reduce_sums, current, shard_positions
    from ..models.memory import BatchPlanner, MemoryProbe, default_budget
    from .nonfinite import NonFiniteWatch

    model = lm.model
    device = input_device(model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    mats = scored_matrices(model)
    ctx = dist or current()
    mine = [sequences[i] for i in shard_positions(len(sequences), ctx)]
    acc = _Accumulator()
    tokens = cursor = 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        acc.sums, acc.count, tokens, cursor = state.sums, state.count, state.tokens, state.cursor
        batch_size = state.batch_size or batch_size  # same batch boundaries as before the stop
    budget = None
    if batch_size == "auto":
        budget = max_memory if max_memory is not None else default_budget(device)
    planner = BatchPlanner(batch_size, budget)
    probe = MemoryProbe(device)
    watch = NonFiniteWatch(model, (meta or {}).get("dtype"))
    start = time.perf_counter()
    bar = tqdm(total=len(mine), initial=cursor, desc="profiling" + (
        f" [rank {ctx.rank}/{ctx.world_size}]" if ctx.enabled else ""), unit="sample",
        disable=not progress)
    while cursor < len(mine):
        size = planner.next_size(len(mine) - cursor)
        chunk = mine[cursor:cursor + size]
        before = probe.current()
        measured = planner.probing and probe.reset_peak()
        with watch:  # names the first module whose output overflowed, if any
            try:
                clean = _score_exactly(model, chunk, pad, device, acc, objective, mats,
                                       planner, set())
            except UserError:
                watch.check()
                raise
        watch.check()
        if measured and clean:
            planner.observe(size, before, probe.peak())
        acc.count += len(chunk)
        tokens += sum(len(s) for s in chunk)
        cursor += len(chunk)
        bar.update(len(chunk))
        if checkpoint is not None and cursor < len(mine) and checkpoint.due(cursor):
            checkpoint.save(LoopState(acc.sums, acc.count, tokens, cursor, planner.chosen or 0))
    bar.close()
    if ctx.enabled:  # every rank needs every key, even one that scored no sample
        for m in mats:
            if m.name not in acc.sums:
                acc.sums[m.name] = torch.zeros(m.module.weight.shape, dtype=torch.float32)
        all_reduce_sums(acc.sums, ctx)
        acc.count = int(all_reduce_number(acc.count, ctx))
        tokens = int(all_reduce_number(tokens, ctx))
    means = acc.take_mean()  # in place: the run's peak stays the batches' peak
    maps = {m.name: means[m.name] for m in mats}  # model order (the backward pass runs reversed)
    for name, t in maps.items():
        if not torch.isfinite(t).all():
            raise UserError(f"non-finite activations in {name} (overflow in the model's dtype?); "
                            "use --dtype float32")
    info = dict(meta or {})
    info.update(objective=objective, samples=len(sequences), tokens_scored=tokens,
                batch_size=planner.chosen if planner.chosen is not None else batch_size,
                wall_time_s=round(time.perf_counter() - start, 3), versions=versions())
    if planner.requested == "auto" or planner.cap is not None:
        info["batch_planner"] = planner.describe()
    if ctx.enabled:
        info["world_size"] = ctx.world_size
    if state is not None:
        info["resumed_at_sample"] = state.cursor
    return Profile(maps, {m.name: m.layer for m in mats}, {m.name: m.matrix for m in mats}, info)


class _Accumulator(MeanAccumulator):
    """The mean accumulator of the profile loop, made safe to retry a batch after OOM.

    ``skip`` names matrices that already hold the current batch (their backward hooks ran
    before the error); ``added`` records the matrices added in the current attempt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skip: set[str] = set()
        self.added: set[str] = set()

    def wants(self, matrix) -> bool:
        return matrix.name not in self.skip

    def end_batch(self, n: int) -> None:
        pass  # the loop counts a batch once, after all its retried parts succeeded

    def _place(self, name: str, device: torch.device) -> None:
        held = self.sums.get(name)
        if held is not None and held.device != device:  # resumed (CPU) or offloaded model
            self.sums[name] = held.to(device)

    def add(self, matrix, acts: torch.Tensor) -> None:
        self._place(matrix.name, acts.device)
        super().add(matrix, acts)
        self.added.add(matrix.name)

    def add_abs_grad(self, matrix, abs_grad: torch.Tensor, abs_weight: torch.Tensor) -> None:
        self._place(matrix.name, abs_grad.device)
        super().add_abs_grad(matrix, abs_grad, abs_weight)
        self.added.add(matrix.name)


def _score_exactly(model, chunk, pad, device, acc, objective, mats, planner, skip) -> bool:
    """Score ``chunk`` into ``acc`` for every matrix not in ``skip``; on OOM split and retry.

    Returns True when no OOM happened (the memory measurement of the batch is then valid).
    """
    from ..models.memory import is_oom, release

    acc.skip, acc.added = set(skip), set()
    ids, mask = pad_batch(chunk, pad, device)
    failed = None
    try:
        values = score_batch(model, ids, mask, [acc], objective, mats)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        failed = type(e).__name__
    if failed is None:
        acc.skip = set()
        if not torch.isfinite(values).all():
            raise UserError("the objective is not finite (overflow?); use --dtype float32")
        return True
    done = skip | acc.added  # these matrices already hold every sample of the chunk
    del ids, mask
    release(device)
    if len(chunk) == 1:
        raise UserError("out of memory while scoring a single sample; lower --seq-len, use a "
                        "smaller --dtype, or profile with --device-map auto --max-memory ...")
    planner.shrink(len(chunk))
    half = (len(chunk) + 1) // 2
    for part in (chunk[:half], chunk[half:]):
        _score_exactly(model, part, pad, device, acc, objective, mats, planner, done)
    acc.skip = set()
    return False


def input_device(model) -> torch.device:
    """Where input ids go: the first accelerator of a dispatched model, else the first weight's."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for d in device_map.values():
            if d not in ("cpu", "disk", "meta"):
                return torch.device(d if isinstance(d, str) else f"cuda:{d}")
        return torch.device("cpu")
    return next(model.parameters()).device


# --------------------------------------------------------------------------- counts


@dataclass
class Counts:
    """The paper's N_i: activated weights (mean A > gamma) per layer and per matrix type."""

    gamma: float
    gamma_rule: str  # "absolute" or "quantile=<Q>"
    layer_counts: list[int]
    matrix_counts: dict[str, list[int]]
    scored_per_layer: list[int]
    scored_per_matrix: dict[str, list[int]] = field(default_factory=dict)  # weights per matrix

    def to_json(self) -> dict:
        return asdict(self)


def threshold(profile: Profile, gamma: float | None = None,
              gamma_quantile: float | None = None) -> tuple[float, str]:
    """gamma itself, or the value with a fraction ``gamma_quantile`` of all weights above it."""
    if (gamma is None) == (gamma_quantile is None):
        raise UserError("give exactly one of --gamma or --gamma-quantile")
    if gamma is not None:
        if gamma < 0:
            raise UserError(f"--gamma must be >= 0 (got {gamma})")
        return float(gamma), "absolute"
    if not 0 < gamma_quantile < 1:
        raise UserError(f"--gamma-quantile must be in (0, 1) (got {gamma_quantile})")
    rule = f"quantile={gamma_quantile}"
    flats = [v.reshape(-1) for v in profile.maps.values()]
    total = sum(f.numel() for f in flats)
    if total > 200_000_000:  # estimate on a fixed subsample for very large models
        gen = torch.Generator().manual_seed(0)
        values = _gather(flats, torch.randint(total, (50_000_000,), generator=gen))
        rule += " (estimated on 5e7 sampled weights)"
    else:
        values = torch.cat(flats)
    k = values.numel() - int(round(gamma_quantile * values.numel()))
    k = min(max(k, 1), values.numel())
    return float(values.kthvalue(k).values), rule


def _gather(flats: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``torch.cat(flats)[index]`` as a multiset (in tensor order), without forming the
    concatenation: the maps of a large model are never copied whole."""
    ends = torch.tensor([f.numel() for f in flats]).cumsum(0)
    which = torch.bucketize(index, ends, right=True)  # the tensor each global index falls in
    parts = []
    for t, f in enumerate(flats):
        local = index[which == t] - (ends[t - 1] if t else 0)
        parts.append(f[local])
    return torch.cat(parts)


def counts(profile: Profile, gamma: float | None = None,
           gamma_quantile: float | None = None) -> Counts:
    g, rule = threshold(profile, gamma, gamma_quantile)
    n_layers = profile.num_layers
    layer_counts = [0] * n_layers
    scored = [0] * n_layers
    per_matrix = {t: [0] * n_layers for t in profile.matrix_types}
    sizes = {t: [0] * n_layers for t in profile.matrix_types}
    for name, v in profile.maps.items():
        i, t = profile.layers[name], profile.matrices[name]
        c = int((v > g).sum())
        layer_counts[i] += c
        per_matrix[t][i] += c
        scored[i] += v.numel()
        sizes[t][i] += v.numel()
    return Counts(g, rule, layer_counts, per_matrix, scored, sizes)


def counts_one_gamma(profiles: list[Profile], names: list[str], gamma: float | None = None,
                     gamma_quantile: float | None = 0.1,
                     reference: str | None = None) -> list[Counts]:
    """Counts of several profiles with one gamma per model (the paper compares runs of a model
    at one threshold): ``gamma`` itself, else the ``gamma_quantile`` of the model's reference
    run (``reference`` among ``names`` when given, else the model's first run); each rule says
    which run fixed it."""
    if gamma is not None:
        return [counts(p, gamma=gamma) for p in profiles]
    order = sorted(range(len(profiles)), key=lambda i: names[i] != reference)
    chosen: dict[str, tuple[float, str]] = {}
    for i in order:
        key = json.dumps(list(profiles[i].maps))
        if key not in chosen:
            g, rule = threshold(profiles[i], gamma_quantile=gamma_quantile)
            chosen[key] = (g, f"{rule} of {names[i]}")
    out = []
    for p in profiles:
        g, rule = chosen[json.dumps(list(p.maps))]
        c = counts(p, gamma=g)
        c.gamma_rule = rule
        out.append(c)
    return out
