"""The paper's similarity experiments end to end (Findings 2-3, Validation 3), resumable.

* ``reproduce_similarity``: within-domain pairs of every dataset and cross-domain pairs of every
  two datasets from one joint pass (``actpat.similarity.group_batches``); each finished batch is
  appended to ``OUT/checkpoint.jsonl``, so an interrupted run resumes where it stopped. The same
  pass accumulates each dataset's mean activation map (saved as profiles under
  ``OUT/profiles/<dataset>/``, for ``reproduce_relatedness``). Writes ``OUT/similarity.json``
  (the format of ``actpat similarity``) and its figures.
* ``reproduce_relatedness``: the dataset x dataset matrix from saved profiles (``actpat relate``
  format) and its heatmaps, ``OUT/relate.json``, ``OUT/relatedness_<band>.png``.
* ``reproduce_sts``: ``actpat sts`` on a pairs dataset, ``OUT/sts.json`` + ``OUT/sts_layers.png``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ..models.architectures import ScoredMatrix
from ..models.loading import LoadedModel

FINDING2_DATASETS = ("boolq", "mmlu", "humaneval", "siqa", "hellaswag", "c4", "wikitext2")
CHECKPOINT = "checkpoint.jsonl"


class GroupMeans:
    """Sink: per group (2 consecutive batch slots per group), the running sum of A(s, w)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.sums: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        self.count = 0  # samples per group

    def add(self, matrix: ScoredMatrix, acts: torch.Tensor) -> None:
        for g, n in enumerate(self.names):
            s = acts[2 * g:2 * g + 2].sum(0)
            if matrix.name in self.sums[n]:
                self.sums[n][matrix.name] += s
            else:
                self.sums[n][matrix.name] = s.clone()

    def end_batch(self, n: int) -> None:
        self.count += 2

    def profiles(self, mats: list[ScoredMatrix], meta: dict) -> dict:
        from ..activation.profiling import Profile

        return {n: Profile({k: (v / max(1, self.count)).cpu() for k, v in self.sums[n].items()},
                           {m.name: m.layer for m in mats}, {m.name: m.matrix for m in mats},
                           dict(meta, dataset=n, samples=self.count))
                for n in self.names}


def _append(path: Path):
    """The checkpoint opened for appending; a torn last line (a crash mid-write) is ended first,
    so the next record starts a line of its own instead of being lost with the torn one."""
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    fh = path.open("a")
    if torn:
        fh.write("\n")
    return fh


def _pack(res) -> dict:
    sims, per_type = res
    return {"layer": [float(x) for x in sims],
            "matrix": {t: [float(x) for x in v] for t, v in per_type.items()}}


def _unpack(d) -> tuple[np.ndarray, dict]:
    return np.array(d["layer"]), {t: np.array(v) for t, v in d["matrix"].items()}


def reproduce_similarity(lm: LoadedModel, out, datasets=FINDING2_DATASETS, pairs: int = 32,
                         seq_len: int = 128, seed: int = 0, data_dir: str | None = None,
                         objective: str = "max-logit", budget_s: float | None = None,
                         save_profiles: bool = True, progress: bool = True) -> dict:
    """Findings 2: within vs cross-domain pair similarity per layer; resumable.

    ``budget_s``: stop starting new batches after this many seconds (the result then holds the
    pairs finished so far and says so in ``pairs_done``).
    """
    from tqdm.auto import tqdm

    from ..data.datasets import sample_sequences
    from ..models.architectures import scored_matrices
    from ..outputs.artifacts import write_similarity
    from ..runs import versions
    from ..analysis.similarity import (comparison_json, group_batches, group_comparisons, score_grams,
                             stack_pairs)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(datasets)
    samples = {d: sample_sequences(lm.tokenizer, d, 2 * pairs, seq_len, seed, None, data_dir)
               for d in names}
    batches = group_batches({d: s.sequences for d, s in samples.items()})
    ckpt = out / CHECKPOINT
    done: dict[int, dict] = {}
    if ckpt.exists():
        for line in ckpt.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if rec.get("key") == [names, pairs, seq_len, seed, objective]:
                done[rec["k"]] = rec
    todo = [k for k in range(pairs) if k not in done]
    means = GroupMeans(names) if save_profiles else None
    start = time.perf_counter()
    grams = score_grams(lm, (batches[k] for k in todo), objective,
                        [means] if means is not None else ())
    bar = tqdm(total=pairs, initial=len(done), desc="finding2 batches", disable=not progress)
    with _append(ckpt) as fh:
        for k, gram in zip(todo, grams):
            comp = group_comparisons(names, gram)
            rec = {"key": [names, pairs, seq_len, seed, objective], "k": k,
                   "within": {n: _pack(v) for n, v in comp["within"].items()},
                   "cross": {f"{a}|{b}": _pack(v) for (a, b), v in comp["cross"].items()}}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[k] = rec
            bar.update(1)
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
    bar.close()
    seconds = time.perf_counter() - start
    ks = sorted(done)
    comparisons = []
    for n in names:
        ix = samples[n].indices
        comparisons.append(comparison_json(
            "within", n, n, stack_pairs([_unpack(done[k]["within"][n]) for k in ks]),
            [(ix[k], ix[pairs + k]) for k in ks]))
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            comparisons.append(comparison_json(
                "cross", a, b, stack_pairs([_unpack(done[k]["cross"][f"{a}|{b}"]) for k in ks]),
                [(samples[a].indices[k], samples[b].indices[k]) for k in ks]))
    scored_now = 2 * len(names) * (len(ks) - (pairs - len(todo)))
    result = {
        "kind": "actpat-similarity", "model": lm.identity, "objective": objective,
        "seq_len": seq_len, "seed": seed, "pairs": pairs, "pairs_done": len(ks),
        "num_layers": len(comparisons[0]["per_pair"][0]) if ks else None,
        "matrix_types": list(comparisons[0]["per_matrix"]) if ks else [],
        "datasets": {d: {"source": s.source, "split": s.split, "sample_indices": s.indices,
                         "window_start": s.window_start,
                         "tokens": sum(len(x) for x in s.sequences)} for d, s in samples.items()},
        "comparisons": comparisons,
        "timing": {"seconds": round(seconds, 2), "samples_scored": scored_now,
                   "seconds_per_sample": round(seconds / max(1, scored_now), 4),
                   "seconds_per_pair_comparison": None,
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                   "note": "this session only; batches from a resumed checkpoint not timed"},
        "versions": versions(),
    }
    if ks:
        write_similarity(result, out)
    if means is not None and means.count:
        meta = {"model": lm.identity, "seq_len": seq_len, "seed": seed, "objective": objective,
                "note": "mean over the finding2 samples scored in this session"}
        for n, prof in means.profiles(scored_matrices(lm.model), meta).items():
            prof.meta["data_source"] = samples[n].source
            prof.save(out / "profiles" / n)
    return result


def reproduce_relatedness(runs: list[str], out, reference: str = "c4",
                          layers: str | None = None) -> dict:
    """Figure 6: dataset x dataset similarity of saved profiles, with heatmaps per band."""
    from ..analysis.similarity import relate_runs
    from ..outputs.artifacts import write_relate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result, _ = relate_runs([str(r) for r in runs], reference, layers)
    write_relate(result, out / "relate.json", out / "relatedness_deep.png", "deep")
    for band in result["bands"]:
        if band != "deep":
            write_relate(result, None, out / f"relatedness_{band}.png", band)
    return result


def reproduce_sts(lm: LoadedModel, out, dataset: str = "stsb", samples: int | None = 256,
                  seed: int = 0, data_dir: str | None = None, max_tokens: int = 128,
                  pairs_per_batch: int = 8, bootstrap: int = 1000,
                  budget_s: float | None = None, progress: bool = True) -> dict:
    """Finding 3 / Validation 3 on one pairs dataset, resumable and stoppable.

    Pairs are scored in a seeded random order (the first ``samples`` of a permutation of all
    pairs; None: all), each finished batch appended to ``OUT/checkpoint.jsonl``; after
    ``budget_s`` seconds no new batch starts. Whatever is finished is then a uniform random
    sample of the dataset's pairs; ``sts.json`` reports it in input order, with
    ``pairs_done`` and ``pairs_planned``.
    """
    import random

    from tqdm.auto import tqdm

    from ..outputs.artifacts import write_sts
    from ..runs import versions
    from ..analysis.similarity import pair_similarity
    from ..analysis.sts import Pairs, encode_pairs, hidden_state_similarity, load_pairs, sts_statistics

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    everything = load_pairs(dataset, None, seed, None, data_dir)
    n_all = len(everything.indices)
    order = random.Random(seed).sample(range(n_all), n_all)[:samples or n_all]
    encoded = encode_pairs(lm.tokenizer, everything, max_tokens)
    key = [dataset, seed, max_tokens, "max-logit"]
    ckpt = out / CHECKPOINT
    done: dict[int, tuple] = {}
    if ckpt.exists():
        for line in ckpt.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("key") == key:
                for i, r in zip(rec["pairs"], rec["sims"]):
                    done[i] = _unpack(r)
    todo = [i for i in order if i not in done]
    start = time.perf_counter()
    scored_now = 0
    bar = tqdm(total=len(order), initial=len(order) - len(todo), desc=f"{dataset} pairs",
               disable=not progress)
    with _append(ckpt) as fh:
        for s in range(0, len(todo), pairs_per_batch):
            chunk = todo[s:s + pairs_per_batch]
            sims = pair_similarity(lm, [encoded[i] for i in chunk], pairs_per_batch)
            packed = [_pack((sims.layer[k], {t: v[k] for t, v in sims.matrix.items()}))
                      for k in range(len(chunk))]
            fh.write(json.dumps({"key": key, "pairs": chunk, "sims": packed}) + "\n")
            fh.flush()
            for i, r in zip(chunk, packed):
                done[i] = _unpack(r)
            scored_now += len(chunk)
            bar.update(len(chunk))
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
    bar.close()
    t_act = time.perf_counter() - start
    ids = sorted(i for i in done if i in set(order))  # input order
    sub = Pairs([everything.a[i] for i in ids], [everything.b[i] for i in ids],
                everything.scores[ids], [everything.indices[i] for i in ids], everything.source,
                dataset, everything.split, everything.fields)
    start = time.perf_counter()
    base = hidden_state_similarity(lm, [encoded[i] for i in ids], 2 * pairs_per_batch)
    t_base = time.perf_counter() - start
    layer = np.array([done[i][0] for i in ids])
    types = list(done[ids[0]][1])
    matrix = {t: np.array([done[i][1][t] for i in ids]) for t in types}
    result = sts_statistics(layer, matrix, base, sub.scores, bootstrap, seed, extra=dict(
        dataset=dataset, split=sub.split, source=sub.source, pair_fields=list(sub.fields),
        samples=len(ids), pairs_done=len(ids), pairs_planned=len(order), pairs_available=n_all,
        sampling="seeded random order over all pairs; the finished ones, in input order",
        indices=sub.indices, objective="max-logit", max_tokens=max_tokens,
        tokens_scored=sum(len(encoded[i][0]) + len(encoded[i][1]) for i in ids),
        timing={"activation_seconds_this_session": round(t_act, 2),
                "pairs_scored_this_session": scored_now,
                "seconds_per_pair": round(t_act / max(1, scored_now), 3),
                "baseline_seconds": round(t_base, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    result.update(model=lm.identity, seed=seed, versions=versions())
    write_sts(result, out)
    return result
