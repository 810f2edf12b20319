"""Similarity of activation patterns (docs/method.md section 2), computed while scoring.

For two samples a and b and one decoder layer, with the layer's scored matrices flattened and
concatenated into activation vectors (A(s, w) >= 0 for every weight),

    sim(a, b) = sum |a * b| / (||a|| ||b||)   -- the cosine of |a| and |b|, in [0, 1].

Nothing the size of the model is kept per sample: ``GramSink`` receives each batch's per-sample
activations matrix by matrix and keeps only the B x B Gram matrix of the batch's samples per
layer (and per matrix type). The samples to compare are therefore scored *in the same batch*;
memory stays flat in the number of pairs, and N pairs cost what profiling 2N samples costs.

``dataset_similarity`` compares saved mean profiles instead (the dataset x dataset matrix,
paper Figure 6): per layer, the cosine of the two profiles' ``layer_vector``s.

``RUN/similarity.json`` (written by ``actpat similarity``; read by the HTML report)::

    {
      "kind": "actpat-similarity", "model": {...identity}, "objective": "max-logit",
      "seq_len": 128, "seed": 0, "pairs": P, "num_layers": L, "matrix_types": ["q", ...],
      "datasets": {name: {"source": ..., "split": ..., "sample_indices": [...]}},
      "comparisons": [
        {"kind": "within" | "cross", "datasets": [A, B],   # within: A == B
         "pairs": [[i, j], ...],          # sample indices (record index / token offset) per pair
         "per_pair": [[sim per layer] per pair],           # P x L
         "per_matrix": {type: [[sim per layer] per pair]}, # P x L per matrix type
         "summary": {"mean": [L], "median": [L], "q1": [L], "q3": [L]}}
      ],
      "timing": {"seconds": s, "samples_scored": n, "seconds_per_sample": s,
                 "seconds_per_pair_comparison": s, "peak_rss_mb": m},
      "versions": {...}
    }

(``reproduce_similarity`` writes the same, plus ``pairs_done`` when its time budget ended it
early.) With three or more datasets, ``actpat similarity`` lists every within comparison, then
every cross comparison.

Within-domain pairs are (sample k, sample P + k) of 2P different samples of one dataset;
cross-domain pairs are (sample k of A, sample k of B).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..activation.metric import pad_batch, score_batch
from ..errors import UserError
from ..models.architectures import ScoredMatrix, scored_matrices
from ..models.loading import LoadedModel


# --------------------------------------------------------------------------- the sink


class GramSink:
    """Per layer and per (matrix type, layer): the batch's Gram matrix of activation vectors.

    ``G[i, j] = sum_w A(s_i, w) A(s_j, w)`` over the layer's scored weights (float32 products,
    float64 sums); ``pop()`` returns the batch's Gram matrices and clears them for the next batch.
    """

    def __init__(self) -> None:
        self.layer: dict[int, torch.Tensor] = {}
        self.matrix: dict[tuple[str, int], torch.Tensor] = {}

    def add(self, matrix: ScoredMatrix, acts: torch.Tensor) -> None:
        flat = acts.reshape(acts.shape[0], -1)
        gram = _gram64(flat)
        key = (matrix.matrix, matrix.layer)
        self.matrix[key] = self.matrix[key] + gram if key in self.matrix else gram
        self.layer[matrix.layer] = self.layer[matrix.layer] + gram \
            if matrix.layer in self.layer else gram

    def pop(self) -> "BatchGram":
        layers = sorted(self.layer)
        types = list(dict.fromkeys(t for t, _ in self.matrix))
        out = BatchGram(
            torch.stack([self.layer[i] for i in layers]),
            {t: torch.stack([self.matrix[(t, i)] if (t, i) in self.matrix
                             else torch.zeros_like(self.layer[i]) for i in layers])
             for t in types},
        )
        self.layer.clear()
        self.matrix.clear()
        return out


def _gram64(flat: torch.Tensor) -> torch.Tensor:
    """F F^T: float32 products over chunks of 2^18 weights, the chunks summed in float64.

    (Relative error ~5e-7 of the largest entry; a float64 copy would cost 3-4x the time.)
    """
    batch, n = flat.shape
    gram = torch.zeros(batch, batch, dtype=torch.float64, device=flat.device)
    step = 1 << 18
    for s in range(0, n, step):
        chunk = flat[:, s:s + step]
        gram += (chunk @ chunk.T).double()
    return gram.cpu()


@dataclass
class BatchGram:
    layer: torch.Tensor  # (L, B, B) float64
    matrix: dict[str, torch.Tensor]  # type -> (L, B, B)

    def cosine(self, i: int, j: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """sim of batch samples i and j: per layer (L,), and per matrix type (L,)."""
        return _cos(self.layer, i, j), {t: _cos(g, i, j) for t, g in self.matrix.items()}


def _cos(gram: torch.Tensor, i: int, j: int) -> np.ndarray:
    num = gram[:, i, j]
    den = (gram[:, i, i] * gram[:, j, j]).sqrt()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).numpy()  # 0/0 (a layer with no activation at all) -> nan


# --------------------------------------------------------------------------- scoring


def score_grams(lm: LoadedModel, batches: Iterable[Sequence[list[int]]],
                objective: str = "max-logit", extra_sinks: Sequence = ()) -> Iterator[BatchGram]:
    """Score each batch of token sequences (one forward+backward) and yield its Gram matrices.

    ``extra_sinks`` (e.g. a mean accumulator) receive the same activations. ``lm`` may be a
    ``StreamedModel`` (one decoder layer in memory: ``score_grams_streamed``).
    """
    from ..models.streamed import StreamedModel

    if isinstance(lm, StreamedModel):
        if extra_sinks:
            raise UserError("the streamed engine scores pairs only (no mean profiles on the side)")
        yield from score_grams_streamed(lm, batches, objective)
        return
    model = lm.model
    device = next(model.parameters()).device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    mats = scored_matrices(model)
    sink = GramSink()
    for batch in batches:
        ids, mask = pad_batch(list(batch), pad, device)
        score_batch(model, ids, mask, [sink, *extra_sinks], objective, mats)
        yield sink.pop()


def score_grams_streamed(sm, batches: Iterable[Sequence[list[int]]],
                         objective: str = "max-logit", group: int | None = None
                         ) -> Iterator[BatchGram]:
    """``score_grams`` with decoder layers read from disk one at a time
    (``activation.streaming.walk_group``): ``group`` batches per walk, each batch's Gram
    matrices gathered layer by layer as the walk comes down; layer inputs go to scratch files
    in a temporary folder."""
    import itertools
    import tempfile
    from pathlib import Path

    from ..activation.streaming import GROUP_BATCHES, Scratch, walk_group

    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    for p in sm.model.parameters():
        p.requires_grad_(False)
    by_layer: dict[int, list[ScoredMatrix]] = {}
    for m in scored_matrices(sm.model):
        by_layer.setdefault(m.layer, []).append(m)
    it = iter(batches)
    with tempfile.TemporaryDirectory(prefix="actpat-pairs-") as tmp:
        scratch = Scratch(Path(tmp) / "hidden")
        while chunk := list(itertools.islice(it, group or GROUP_BATCHES)):
            sinks = [GramSink() for _ in chunk]
            walk_group(sm, scratch, [pad_batch(list(b), pad) for b in chunk], objective,
                       lambda i: (by_layer.get(i, []), lambda b: [sinks[b]], lambda: None))
            for sink in sinks:
                yield sink.pop()


@dataclass
class PairSimilarity:
    """Per-pair, per-layer similarity; ``matrix`` holds the same per matrix type."""

    layer: np.ndarray  # (P, L)
    matrix: dict[str, np.ndarray]  # type -> (P, L)
    seconds: float = 0.0
    samples_scored: int = 0

    @property
    def num_pairs(self) -> int:
        return self.layer.shape[0]


def pair_similarity(lm: LoadedModel, pairs: Sequence[tuple[list[int], list[int]]],
                    pairs_per_batch: int = 2, objective: str = "max-logit",
                    progress: bool = False, desc: str = "pairs") -> PairSimilarity:
    """sim(a, b) per layer for each pair; both members of a pair are scored in one batch.

    In a joined process group (torchrun) each rank scores every N-th batch of pairs and the
    per-pair results are gathered back in input order on every rank (same values as one process).
    """
    from tqdm.auto import tqdm

    from ..activation.distributed import active, gather_in_order, shard

    start = time.perf_counter()
    every = [pairs[i:i + pairs_per_batch] for i in range(0, len(pairs), pairs_per_batch)]
    ctx = active()  # under torchrun with a process group: this rank's share of the batches
    chunks = shard(every, ctx)
    batches = ([s for pair in chunk for s in pair] for chunk in chunks)
    mine = []  # per chunk: [(sims, per_type) per pair]
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="pair", disable=not progress)
    for chunk, gram in zip(chunks, score_grams(lm, batches, objective)):
        mine.append([gram.cosine(2 * k, 2 * k + 1) for k in range(len(chunk))])
        bar.update(len(chunk))
    bar.close()
    layer, matrix = [], {}
    for per_chunk in gather_in_order(mine, len(every), ctx):
        for sims, per_type in per_chunk:
            layer.append(sims)
            for t, v in per_type.items():
                matrix.setdefault(t, []).append(v)
    return PairSimilarity(np.array(layer), {t: np.array(v) for t, v in matrix.items()},
                          time.perf_counter() - start, 2 * len(pairs))


@dataclass
class GroupSimilarity:
    """Within-domain pairs of every group and cross-domain pairs of every two groups."""

    within: dict[str, PairSimilarity]
    cross: dict[tuple[str, str], PairSimilarity]
    seconds: float = 0.0
    samples_scored: int = 0


def group_batches(groups: dict[str, list[list[int]]]) -> list[list[list[int]]]:
    """Batch k holds samples k and P + k of every group, in group order (2 per group)."""
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1 or next(iter(sizes)) % 2:
        raise ValueError("every group needs the same, even number of sequences (2P)")
    half = next(iter(sizes)) // 2
    return [[s for seqs in groups.values() for s in (seqs[k], seqs[half + k])]
            for k in range(half)]


def group_comparisons(names: list[str], gram: BatchGram) -> dict:
    """From one group batch: {"within": {X: (sims, per_type)}, "cross": {(X, Y): ...}}."""
    within = {n: gram.cosine(2 * g, 2 * g + 1) for g, n in enumerate(names)}
    cross = {(x, y): gram.cosine(2 * a, 2 * (a + 1 + b))
             for a, x in enumerate(names) for b, y in enumerate(names[a + 1:])}
    return {"within": within, "cross": cross}


def stack_pairs(results: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> PairSimilarity:
    """Per-pair (sims, per_type) results into one ``PairSimilarity``."""
    types = list(results[0][1]) if results else []
    return PairSimilarity(np.array([r[0] for r in results]),
                          {t: np.array([r[1][t] for r in results]) for t in types})


def group_similarity(lm: LoadedModel, groups: dict[str, list[list[int]]],
                     objective: str = "max-logit", progress: bool = False) -> GroupSimilarity:
    """All comparisons of several datasets from one pass over their samples.

    Each group holds 2P sequences. Batch k holds samples k and P + k of every group, so one
    batch gives the within-domain pair (k, P + k) of each group and the cross-domain pair
    (sample k of X, sample k of Y) of every two groups: 2P samples per dataset in all, instead
    of 2P per comparison. Under torchrun each rank scores every N-th batch (as
    ``pair_similarity``); every rank gets all results in order.
    """
    from tqdm.auto import tqdm

    from ..activation.distributed import active, gather_in_order, shard

    names = list(groups)
    batches = group_batches(groups)
    ctx = active()  # under torchrun with a process group: this rank's share of the batches
    mine = shard(batches, ctx)
    start = time.perf_counter()
    done = []
    for gram in tqdm(score_grams(lm, mine, objective), total=len(mine),
                     desc="pair batches", unit="batch", disable=not progress):
        done.append(group_comparisons(names, gram))
    done = gather_in_order(done, len(batches), ctx)
    seconds = time.perf_counter() - start
    within = {n: stack_pairs([d["within"][n] for d in done]) for n in names}
    cross = {k: stack_pairs([d["cross"][k] for d in done]) for k in done[0]["cross"]} \
        if done else {}
    return GroupSimilarity(within, cross, seconds, sum(len(b) for b in batches))


# --------------------------------------------------------------------------- summaries


def summarize(per_pair: np.ndarray) -> dict[str, list[float]]:
    """Per-layer mean, median and quartiles of a (P, L) array of similarities."""
    q1, med, q3 = np.nanpercentile(per_pair, [25, 50, 75], axis=0)
    return {"mean": _floats(np.nanmean(per_pair, axis=0)), "median": _floats(med),
            "q1": _floats(q1), "q3": _floats(q3)}


def _floats(a) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=float)]


def comparison_json(kind: str, a: str, b: str, sims: PairSimilarity,
                    pairs: list[tuple[int, int]]) -> dict:
    return {"kind": kind, "datasets": [a, b], "pairs": [list(p) for p in pairs],
            "per_pair": [_floats(r) for r in sims.layer],
            "per_matrix": {t: [_floats(r) for r in v] for t, v in sims.matrix.items()},
            "summary": summarize(sims.layer)}


# --------------------------------------------------------------------------- profiles


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a * b| / (||a|| ||b||) in float64 (nan when either vector is all zero)."""
    a, b = a.double().abs(), b.double().abs()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def profile_layer_similarity(p, q) -> np.ndarray:
    """Per-layer similarity of two saved profiles (``Profile``), shape (L,)."""
    if p.num_layers != q.num_layers or list(p.maps) != list(q.maps):
        from ..errors import UserError

        raise UserError("profiles come from different models (their scored matrices differ); "
                        "compare runs of one model")
    return np.array([cosine(p.layer_vector(i), q.layer_vector(i)) for i in range(p.num_layers)])


@dataclass
class DatasetMatrix:
    """Dataset x dataset similarity: per layer (L, N, N), and band means of it."""

    names: list[str]
    per_layer: np.ndarray  # (L, N, N)
    bands: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> [start, end)

    def band(self, name: str) -> np.ndarray:
        start, end = self.bands[name]
        return self.per_layer[start:end].mean(axis=0)

    def ranking(self, reference: str, band: str) -> list[tuple[str, float]]:
        """The other datasets, closest to ``reference`` first, in ``band``."""
        m = self.band(band)
        r = self.names.index(reference)
        others = [(n, float(m[r, i])) for i, n in enumerate(self.names) if i != r]
        return sorted(others, key=lambda x: -x[1])


def dataset_similarity(profiles: list, names: list[str],
                       bands: dict[str, tuple[int, int]]) -> DatasetMatrix:
    """Per-layer cosine between every two profiles; a band's matrix is its layers' mean."""
    n = len(profiles)
    layers = profiles[0].num_layers
    out = np.ones((layers, n, n))
    for i in range(layers):  # one layer of every profile at a time: memory stays small
        vecs = [p.layer_vector(i) for p in profiles]
        for a in range(n):
            for b in range(a + 1, n):
                out[i, a, b] = out[i, b, a] = cosine(vecs[a], vecs[b])
    return DatasetMatrix(names, out, dict(bands))


def relate_bands(num_layers: int) -> dict[str, tuple[int, int]]:
    """Layer bands for the dataset matrix, [start, end) 0-based.

    all: every layer; shallow: layers 1 .. 12/32 of depth (layer 0 is special in the paper);
    deep: from 16/32 of depth to the last layer (the middle of the paper's deep bands).
    """
    cut_shallow = max(2, _round(12 * num_layers / 32))
    cut_deep = min(num_layers - 1, _round(16 * num_layers / 32))
    return {"all": (0, num_layers), "shallow": (1, cut_shallow), "deep": (cut_deep, num_layers)}


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(np.floor(x + 0.5))


# --------------------------------------------------------------------------- a similarity run


def similarity_run(lm, datasets: list[str], pairs: int, seq_len: int, seed: int = 0,
                   split: str | None = None, data_dir: str | None = None,
                   objective: str = "max-logit", pairs_per_batch: int = 2,
                   text_field: str = "text", template: str | None = None,
                   progress: bool = True) -> dict:
    """Sample, score and compare; returns the similarity.json object."""
    import resource
    import time

    from ..data.datasets import sample_sequences
    from ..runs import versions

    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")
    per_set = pairs if len(datasets) == 2 else 2 * pairs
    samples = {d: sample_sequences(lm.tokenizer, d, per_set, seq_len, seed, split, data_dir,
                                   text_field, template) for d in datasets}
    start = time.perf_counter()
    comparisons = []
    if len(datasets) == 1:
        (d, s), = samples.items()
        sims = pair_similarity(lm, [(s.sequences[k], s.sequences[pairs + k]) for k in range(pairs)],
                               pairs_per_batch, objective, progress, desc=f"{d} pairs")
        idx = [(s.indices[k], s.indices[pairs + k]) for k in range(pairs)]
        comparisons.append(comparison_json("within", d, d, sims, idx))
        scored = sims.samples_scored
    elif len(datasets) == 2:
        (a, sa), (b, sb) = samples.items()
        sims = pair_similarity(lm, list(zip(sa.sequences, sb.sequences)), pairs_per_batch,
                               objective, progress, desc=f"{a} x {b} pairs")
        comparisons.append(comparison_json("cross", a, b, sims, list(zip(sa.indices, sb.indices))))
        scored = sims.samples_scored
    else:
        res = group_similarity(lm, {d: s.sequences for d, s in samples.items()}, objective,
                               progress)
        for d, sims in res.within.items():
            ix = samples[d].indices
            comparisons.append(comparison_json("within", d, d, sims,
                                               [(ix[k], ix[pairs + k]) for k in range(pairs)]))
        for (a, b), sims in res.cross.items():
            comparisons.append(comparison_json("cross", a, b, sims, list(zip(
                samples[a].indices[:pairs], samples[b].indices[:pairs]))))
        scored = res.samples_scored
    seconds = time.perf_counter() - start
    first = comparisons[0]
    return {
        "kind": "actpat-similarity", "model": lm.identity, "objective": objective,
        "seq_len": seq_len, "seed": seed, "pairs": pairs,
        "num_layers": len(first["per_pair"][0]), "matrix_types": list(first["per_matrix"]),
        "datasets": {d: {"source": s.source, "split": s.split, "sample_indices": s.indices,
                         "window_start": s.window_start,
                         "tokens": sum(len(x) for x in s.sequences)} for d, s in samples.items()},
        "comparisons": comparisons,
        "timing": {"seconds": round(seconds, 2), "samples_scored": scored,
                   "seconds_per_pair_comparison": round(seconds / max(1, sum(
                       len(c["per_pair"]) for c in comparisons)), 4),
                   "seconds_per_sample": round(seconds / max(1, scored), 4),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "versions": versions(),
    }


# --------------------------------------------------------------------------- relate saved profiles


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--layers '{text}' is not A:B (two integers, e.g. 16:30)") from None
    if not 0 <= a < b <= num_layers:
        raise UserError(f"--layers {text} is outside the model's {num_layers} layers; "
                        f"use A:B with 0 <= A < B <= {num_layers}")
    return a, b


def relate_runs(runs: list[str], reference: str | None = None, layers: str | None = None):
    """Figure 6 from saved profiles: (the relate.json object, the ``DatasetSimilarity``).

    ``layers``: an extra band "A:B" (0-based, B exclusive) named ``custom``; ``reference``: the
    dataset the others are ranked against (default c4 when present, else the first).
    """
    from ..activation.profiling import Profile

    if len(runs) < 2:
        raise UserError("give at least two profile runs to relate")
    profiles = [Profile.load(r) for r in runs]
    names = [str(p.meta.get("dataset") or r) for p, r in zip(profiles, runs)]
    if len(set(names)) != len(names):
        names = [f"{n} ({r})" for n, r in zip(names, runs)]
    first = profiles[0]
    for p, r in zip(profiles[1:], runs[1:]):
        if list(p.maps) != list(first.maps):
            raise UserError(f"{r} profiles a different model than {runs[0]}; relate runs "
                            "of one model")
    bands = relate_bands(first.num_layers)
    if layers:
        bands["custom"] = parse_layers(layers, first.num_layers)
    reference = reference or ("c4" if "c4" in names else names[0])
    if reference not in names:
        raise UserError(f"--reference {reference} is not among the datasets ({', '.join(names)})")
    m = dataset_similarity(profiles, names, bands)
    result = {
        "kind": "actpat-relate", "runs": list(runs), "datasets": names,
        "num_layers": first.num_layers, "reference": reference,
        "per_layer": m.per_layer.tolist(),
        "bands": {b: {"start": s, "end": e, "matrix": m.band(b).tolist()}
                  for b, (s, e) in bands.items()},
        "ranking": {b: [list(x) for x in m.ranking(reference, b)] for b in bands},
    }
    return result, m
