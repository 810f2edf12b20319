"""Semantic similarity check (docs/method.md section 2; paper Finding 3 / Validation 3).

For each sentence pair (raw sentences, no prompt) the per-layer activation-pattern similarity
sim(a1, a2) (``actpat.similarity``) is compared with the human similarity score by Spearman's
rho, for every single layer and for bands of deep layers (a band's score is the sum of its
layers' sims). Two baselines from the same model on the same pairs tell whether parameter
activation is a useful similarity signal: the cosine of the mean-pooled hidden states and of
the last token's hidden state, per layer.

Bands (``sts_bands``): layer indices are 0-based and a band [start, end) excludes its end. The
authors' code tries bands starting at layer 12, 16, 20 of 32 and ending at L-2 or L; an end of L
only makes sense as an exclusive end, so the paper's bands on 32 layers are [12, 30), [12, 32),
[16, 30), ... . On a model of depth L they are scaled by fraction with round-half-up: start
round(s * L / 32), end L - round(2 * L / 32) or L (``scaled[12:L-2]`` etc.; on 30 layers
[11, 28), [11, 30), [15, 28), ...). When L >= 32 the paper's absolute bands (start 12, 16, 20,
end L-2 or L) are reported as well (``paper[12:L-2]`` etc.).

Confidence intervals: percentile bootstrap over pairs (resample the pairs with replacement,
recompute rho), ``n_resamples`` draws from ``numpy.random.default_rng(seed)``; the same draws
serve every layer and band.

``RUN/sts.json`` (written by ``actpat sts``; read by the HTML report)::

    {
      "kind": "actpat-sts", "model": {...}, "dataset": "stsb", "split": "validation",
      "source": "local:...", "pair_fields": [A, B, SCORE], "samples": P,
      "indices": [record index per pair], "scores": [human score per pair],
      "num_layers": L, "objective": "max-logit", "max_tokens": 128,
      "per_layer_spearman": [rho per layer], "per_layer_p": [p per layer],
      "per_layer_ci": [[lo, hi] per layer],
      "per_matrix_spearman": {type: [rho per layer]},
      "bands": {name: {"start": s, "end": e, "kind": "scaled" | "paper", "paper": "12:L-2",
                       "rho": r, "p": p, "ci": [lo, hi]}},
      "baselines": {"hidden-mean": [rho per layer], "hidden-last": [rho per layer]},
      "baselines_p": {name: [p per layer]}, "baselines_ci": {name: [[lo, hi] per layer]},
      "baseline_bands": {name: {band: {"rho", "p", "ci"}}},
      "best": {"activation" | baseline: {"layer": i, "rho": r}},
      "pair_similarity": [[sim per layer] per pair, in input order],
      "baseline_pair_similarity": {name: [[cosine per layer] per pair]},
      "bootstrap": {"resamples": n, "seed": s, "level": 0.95, "method": "percentile"},
      "timing": {...}
    }
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..errors import UserError
from ..models.loading import LoadedModel
from .similarity import _floats, _round, pair_similarity

DEFAULT_PAIR_FIELDS = ("sentence1", "sentence2", "score")
PAPER_DEPTH = 32
PAPER_STARTS = (12, 16, 20)
PAPER_END_OFFSETS = (2, 0)  # the band ends at L - 2 or at L (exclusive)


# --------------------------------------------------------------------------- bands


@dataclass(frozen=True)
class Band:
    name: str
    start: int  # first layer, 0-based
    end: int  # exclusive
    kind: str  # "scaled" (by fraction of depth) or "paper" (absolute, L >= 32)
    paper: str  # the paper's band it stands for, e.g. "12:L-2"

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def sts_bands(num_layers: int) -> list[Band]:
    """The paper's deep bands scaled to ``num_layers``, plus the absolute ones when L >= 32."""
    out, seen = [], set()
    for s in PAPER_STARTS:
        for back in PAPER_END_OFFSETS:
            tag = f"{s}:L-{back}" if back else f"{s}:L"
            start = _round(s * num_layers / PAPER_DEPTH)
            end = num_layers - _round(back * num_layers / PAPER_DEPTH)
            if start < end and (start, end) not in seen:
                seen.add((start, end))
                out.append(Band(f"scaled[{tag}]", start, end, "scaled", tag))
    if num_layers >= PAPER_DEPTH:
        for s in PAPER_STARTS:
            for back in PAPER_END_OFFSETS:
                tag = f"{s}:L-{back}" if back else f"{s}:L"
                out.append(Band(f"paper[{tag}]", s, num_layers - back, "paper", tag))
    return out


# --------------------------------------------------------------------------- statistics


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (scipy)."""
    r = stats.spearmanr(np.asarray(x, float), np.asarray(y, float))
    return float(r.statistic), float(r.pvalue)


def _rank_rows(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) indices of pairs drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(x, y, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 indices: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho between x and y (pairs resampled)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = bootstrap_indices(len(x), n_resamples, seed) if indices is None else indices
    rho = _pearson_rows(_rank_rows(x[idx]), _rank_rows(y[idx]))
    lo, hi = np.nanpercentile(rho, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def correlate(values: np.ndarray, scores: np.ndarray, indices: np.ndarray | None,
              level: float = 0.95) -> dict:
    """rho, p and bootstrap interval of each column of ``values`` (P, K) against ``scores``.

    ``indices`` are the bootstrap draws (``bootstrap_indices``); None skips the intervals.
    """
    y_ranks = None if indices is None else _rank_rows(scores[indices])
    rho, p, ci = [], [], []
    for k in range(values.shape[1]):
        col = values[:, k]
        r, pv = spearman(col, scores) if np.isfinite(col).all() else (float("nan"),) * 2
        rho.append(r)
        p.append(pv)
        if indices is None:
            continue
        boot = _pearson_rows(_rank_rows(col[indices]), y_ranks)
        lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)]) \
            if np.isfinite(boot).any() else (float("nan"),) * 2
        ci.append(_floats([lo, hi]))
    return {"rho": _floats(rho), "p": _floats(p), "ci": ci}  # nan -> None (valid JSON)


# --------------------------------------------------------------------------- pairs


@dataclass
class Pairs:
    a: list[str]
    b: list[str]
    scores: np.ndarray
    indices: list[int]  # record index of each pair, ascending (input order)
    source: str
    dataset: str
    split: str | None
    fields: tuple[str, str, str]


def load_pairs(dataset: str, n: int | None = 256, seed: int = 0, split: str | None = None,
               data_dir: str | None = None, pair_fields: tuple[str, str, str] | None = None) -> Pairs:
    """Sentence pairs with a human score from a registered pairs dataset or a local .jsonl file.

    A registered dataset gives a seeded random sample of ``n`` pairs kept in file order; a local
    file gives its first ``n`` pairs; ``n`` None or >= the number of pairs gives all of them.
    """
    from ..data.datasets import get_spec, is_path, load_records

    spec = None if is_path(dataset) else get_spec(dataset)
    if spec is not None and spec.kind != "pairs":
        raise UserError(f"'{dataset}' is not a sentence-pair dataset; use stsb, sick or a .jsonl "
                        "file with --pair-fields A,B,SCORE")
    fields = tuple(pair_fields) if pair_fields else \
        (spec.pair_fields if spec is not None else DEFAULT_PAIR_FIELDS)
    split = None if spec is None else (split or spec.default_split)
    records = load_records(dataset, split, data_dir)
    rows = records.rows
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise UserError(f"pair records have no field '{missing[0]}' (they have: "
                        f"{', '.join(rows[0])}); pass --pair-fields A,B,SCORE")
    if n is not None and n <= 0:
        raise UserError(f"--samples must be at least 1 (got {n})")
    if n is None or n >= len(rows):
        order = list(range(len(rows)))
    elif spec is None:
        order = list(range(n))
    else:
        order = sorted(random.Random(seed).sample(range(len(rows)), n))
    if len(order) < 3:
        raise UserError(f"{len(order)} pairs are too few for a rank correlation; give at least 3")
    fa, fb, fs = fields
    try:
        scores = np.array([float(rows[i][fs]) for i in order])
    except (TypeError, ValueError):
        raise UserError(f"field '{fs}' must hold numbers (the human score); check "
                        "--pair-fields A,B,SCORE") from None
    return Pairs([str(rows[i][fa]) for i in order], [str(rows[i][fb]) for i in order], scores,
                 order, records.source, dataset, split, fields)


def encode_pairs(tokenizer, pairs: Pairs, max_tokens: int = 128) -> list[tuple[list[int], list[int]]]:
    """Raw sentences to token lists (the tokenizer's special tokens, no prompt), truncated."""
    out = []
    for k, (a, b) in enumerate(zip(pairs.a, pairs.b)):
        ta = tokenizer(a, add_special_tokens=True)["input_ids"][:max_tokens]
        tb = tokenizer(b, add_special_tokens=True)["input_ids"][:max_tokens]
        if not ta or not tb:
            raise UserError(f"pair {pairs.indices[k]} has an empty sentence; remove it")
        out.append((ta, tb))
    return out


# --------------------------------------------------------------------------- baselines


@torch.no_grad()
def hidden_state_similarity(lm: LoadedModel, pairs: list[tuple[list[int], list[int]]],
                            batch_size: int = 16) -> dict[str, np.ndarray]:
    """Cosine of mean-pooled and of last-token hidden states per decoder layer, (P, L) each.

    Layer i's state is ``hidden_states[i + 1]`` as transformers returns it: the output of decoder
    layer i (for the last layer, after the final norm where the model applies it there).
    """
    from ..activation.distributed import active, gather_in_order, shard
    from ..activation.metric import pad_batch

    model = lm.model
    device = next(model.parameters()).device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    half = max(1, batch_size // 2)
    chunks = [pairs[s:s + half] for s in range(0, len(pairs), half)]
    ctx = active()  # under torchrun: this rank's share of the chunks, gathered back in order
    mine = []
    for chunk in shard(chunks, ctx):
        seqs = [x for pair in chunk for x in pair]
        ids, mask = pad_batch(seqs, pad, device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        mine.append(_pair_cosines(torch.stack(out.hidden_states[1:]), mask))
    done = gather_in_order(mine, len(chunks), ctx)
    return {"hidden-mean": np.concatenate([d[0] for d in done]),
            "hidden-last": np.concatenate([d[1] for d in done])}


def _pair_cosines(hidden: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """(mean-pooled, last-token) cosines of batch rows 2k and 2k+1, (pairs, L) each, from
    hidden states (L, B, T, H) and the batch's attention mask."""
    from ..activation.metric import last_positions

    hidden = hidden.float()
    m = mask.to(hidden.dtype)[None, :, :, None]
    mean = (hidden * m).sum(2) / m.sum(2)
    last = hidden[:, torch.arange(hidden.shape[1]), last_positions(mask)]
    return [torch.nn.functional.cosine_similarity(h[:, 0::2], h[:, 1::2], dim=-1)
            .T.double().cpu().numpy() for h in (mean, last)]


@torch.no_grad()
def hidden_state_similarity_streamed(sm, pairs: list[tuple[list[int], list[int]]],
                                     batch_size: int = 16, group: int = 8
                                     ) -> dict[str, np.ndarray]:
    """``hidden_state_similarity`` with one decoder layer in memory: ``group`` batches go
    through each layer together; each layer's output gives that layer's cosines at once, and
    the last layer's state is what the model's own code returns above the layers (after the
    final norm where the model applies it)."""
    from ..activation.metric import pad_batch
    from ..models.streamed import run_layers

    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    half = max(1, batch_size // 2)
    chunks = [pairs[s:s + half] for s in range(0, len(pairs), half)]
    n = sm.num_layers
    mean, last = [], []
    for g in range(0, len(chunks), group):
        batches = [pad_batch([x for pair in c for x in pair], pad) for c in chunks[g:g + group]]
        per = [[] for _ in batches]  # per batch: [(mean, last) per layer]

        def each(i, b, h):
            if i < n - 1:  # the last layer's state comes from the model's own code below
                per[b].append(_pair_cosines(h[None], batches[b][1]))

        hidden, tuple_out = run_layers(sm, [{"input_ids": ids, "attention_mask": mask}
                                            for ids, mask in batches], each)
        for b, (ids, mask) in enumerate(batches):
            with sm.head(hidden[b], tuple_out) as model:
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                            use_cache=False, logits_to_keep=1)
            per[b].append(_pair_cosines(out.hidden_states[-1][None], mask))
            mean.append(np.concatenate([m for m, _ in per[b]], axis=1))
            last.append(np.concatenate([x for _, x in per[b]], axis=1))
    return {"hidden-mean": np.concatenate(mean), "hidden-last": np.concatenate(last)}


# --------------------------------------------------------------------------- the run


def run_sts(lm: LoadedModel, pairs: Pairs, max_tokens: int = 128, pairs_per_batch: int = 8,
            objective: str = "max-logit", n_resamples: int = 1000, seed: int = 0,
            level: float = 0.95, progress: bool = True) -> dict:
    """Everything ``RUN/sts.json`` holds (see the module docstring)."""
    encoded = encode_pairs(lm.tokenizer, pairs, max_tokens)
    start = time.perf_counter()
    sims = pair_similarity(lm, encoded, pairs_per_batch, objective, progress, desc="sts pairs")
    t_act = time.perf_counter() - start
    start = time.perf_counter()
    from ..models.streamed import StreamedModel

    baseline = (hidden_state_similarity_streamed if isinstance(lm, StreamedModel) else
                hidden_state_similarity)
    base = baseline(lm, encoded, 2 * pairs_per_batch)
    t_base = time.perf_counter() - start
    return sts_statistics(sims.layer, sims.matrix, base, pairs.scores, n_resamples, seed, level,
                          extra=dict(
                              dataset=pairs.dataset, split=pairs.split, source=pairs.source,
                              pair_fields=list(pairs.fields), samples=len(pairs.indices),
                              indices=pairs.indices, objective=objective, max_tokens=max_tokens,
                              tokens_scored=sum(len(a) + len(b) for a, b in encoded),
                              timing={"activation_seconds": round(t_act, 2),
                                      "seconds_per_pair": round(t_act / len(encoded), 4),
                                      "baseline_seconds": round(t_base, 2)}))


def sts_statistics(layer_sims: np.ndarray, matrix_sims: dict[str, np.ndarray],
                   baselines: dict[str, np.ndarray], scores: np.ndarray, n_resamples: int = 1000,
                   seed: int = 0, level: float = 0.95, extra: dict | None = None) -> dict:
    """Spearman per layer, per band and per baseline, with bootstrap intervals."""
    num_layers = layer_sims.shape[1]
    idx = bootstrap_indices(len(scores), n_resamples, seed)
    act = correlate(layer_sims, scores, idx, level)
    bands = sts_bands(num_layers)
    band_scores = np.stack([layer_sims[:, b.start:b.end].sum(1) for b in bands], axis=1)
    band_res = correlate(band_scores, scores, idx, level)
    out = dict(extra or {})
    out.update(
        kind="actpat-sts", num_layers=num_layers, scores=_floats(scores),
        per_layer_spearman=_floats(act["rho"]), per_layer_p=_floats(act["p"]),
        per_layer_ci=act["ci"],
        per_matrix_spearman={t: _floats(correlate(v, scores, None, level)["rho"])
                             for t, v in matrix_sims.items()},
        bands={b.name: {"start": b.start, "end": b.end, "kind": b.kind, "paper": b.paper,
                        "rho": band_res["rho"][k], "p": band_res["p"][k], "ci": band_res["ci"][k]}
               for k, b in enumerate(bands)},
        baselines={}, baselines_p={}, baselines_ci={}, baseline_bands={},
        bootstrap={"resamples": n_resamples, "seed": seed, "level": level,
                   "method": "percentile"},
    )
    best = {"activation": _best(act["rho"])}
    for name, v in baselines.items():
        r = correlate(v, scores, idx, level)
        out["baselines"][name] = _floats(r["rho"])
        out["baselines_p"][name] = _floats(r["p"])
        out["baselines_ci"][name] = r["ci"]
        bs = correlate(np.stack([v[:, b.start:b.end].sum(1) for b in bands], axis=1), scores,
                       idx, level)
        out["baseline_bands"][name] = {b.name: {"rho": bs["rho"][k], "p": bs["p"][k],
                                                "ci": bs["ci"][k]} for k, b in enumerate(bands)}
        best[name] = _best(r["rho"])
    out["best"] = best
    out["pair_similarity"] = [_floats(r) for r in layer_sims]
    out["baseline_pair_similarity"] = {n: [_floats(r) for r in v] for n, v in baselines.items()}
    return out


def _best(rho: list[float]) -> dict:
    a = np.array(rho, dtype=float)
    if not np.isfinite(a).any():
        return {"layer": None, "rho": None}
    i = int(np.nanargmax(a))
    return {"layer": i, "rho": float(a[i])}


def sts_run(lm, pairs, max_tokens: int = 128, pairs_per_batch: int = 8,
            objective: str = "max-logit", bootstrap: int = 1000, seed: int = 0,
            progress: bool = True) -> dict:
    from ..runs import versions

    result = run_sts(lm, pairs, max_tokens, pairs_per_batch, objective, bootstrap, seed,
                     progress=progress)
    result["model"] = lm.identity
    result["seed"] = seed
    result["versions"] = versions()
    return result
