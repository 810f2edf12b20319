"""Is a bfloat16 profile / calibration as good as a float32 one? (BENCHMARKS.md, docs/precision.md)

Stages (each result is saved in OUT/bf16-safety.json as it finishes; re-running resumes):

1. ``profiles``: ``actpat profile`` of the same C4 validation windows (``--samples`` x
   ``--seq-len``, seed 0, max-logit) once with ``--dtype float32`` and once with
   ``--dtype bfloat16`` (OUT/profile-float32, OUT/profile-bfloat16; the actpat command resumes
   and reuses finished profiles).
2. ``compare``: per scored matrix the relative Frobenius error ||M_bf16 - M_f32|| / ||M_f32||
   (median, worst); the per-layer counts N_i at gamma = float32 profile's 10% quantile for both
   profiles and at each profile's own 10% quantile (Spearman correlation over layers, largest
   relative difference); the overlap of the top-10% weights of each layer (|top_b ∩ top_f| / k);
   the activation allocation S_i at 50% from each profile's counts (max |ΔS_i|).
3. ``prune``: Wanda, uniform, at each ``--sparsities``, calibrated on ``--calib-samples`` C4
   ``--calib-split`` (default train) windows (seed 0) once with the model in float32 and once
   in bfloat16. The *mask* each one chooses is applied to the float32 model, which is then
   evaluated the same way in float32: perplexity on the first ``--windows`` windows of
   ``--seq-len`` tokens of WikiText-2 test and C4 validation. So the comparison isolates the
   calibration's precision. Also recorded: the
   share of pruned positions on which the two masks disagree, and the prune seconds.

    python benchmarks/bf16_safety.py --model smollm2-135m --out runs/bf16-safety-smollm2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def load_state(out: Path) -> dict:
    p = out / "bf16-safety.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_state(out: Path, state: dict) -> None:
    p = out / "bf16-safety.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(p)


def profiles(args, out: Path, state: dict) -> None:
    for dtype in DTYPES:
        run = out / f"profile-{dtype}"
        if (run / "profile.safetensors").exists():
            continue
        cmd = [sys.executable, "-m", "actpat", "profile", "--model", args.model,
               "--dataset", "c4", "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", dtype,
               "--checkpoint-every", "8", "--out", str(run), "--quiet"]
        subprocess.run(cmd, check=True)
    state["profiles"] = {}
    for dtype in DTYPES:
        s = json.loads((out / f"profile-{dtype}" / "summary.json").read_text())
        state["profiles"][dtype] = {"samples": s["samples"], "seq_len": s["seq_len"],
                                    "wall_s": s["wall_time_s"], "dtype": s["dtype"],
                                    "batch_size": s["batch_size"],
                                    "source": s["data_source"]}


def compare(args, out: Path, state: dict) -> None:
    import torch
    from scipy.stats import spearmanr

    from actpat.sparsity.allocators import allocate
    from actpat.activation.profiling import Profile, counts, threshold

    f = Profile.load(out / "profile-float32")
    b = Profile.load(out / "profile-bfloat16")
    errs = {}
    for k, v in f.maps.items():
        errs[k] = float(torch.linalg.vector_norm(b.maps[k] - v) / torch.linalg.vector_norm(v))
    worst = max(errs, key=errs.get)
    per_type = {}
    for k, e in errs.items():
        per_type.setdefault(f.matrices[k], []).append(e)
    gamma_f, _ = threshold(f, gamma_quantile=0.1)
    gamma_b, _ = threshold(b, gamma_quantile=0.1)
    c_f = counts(f, gamma=gamma_f)
    c_b_shared = counts(b, gamma=gamma_f)
    c_b_own = counts(b, gamma=gamma_b)

    def cmp(x, y):
        rel = [abs(p - q) / max(q, 1) for p, q in zip(x.layer_counts, y.layer_counts)]
        return {"spearman": float(spearmanr(x.layer_counts, y.layer_counts).statistic),
                "max_rel_diff": max(rel), "counts_bf16": x.layer_counts}

    overlaps = []
    for i in range(f.num_layers):
        vf, vb = f.layer_vector(i), b.layer_vector(i)
        k = max(1, int(round(0.1 * vf.numel())))
        tf = torch.zeros(vf.numel(), dtype=torch.bool)
        tf[vf.topk(k).indices] = True
        tb_idx = vb.topk(k).indices
        overlaps.append(float(tf[tb_idx].sum()) / k)
    sizes = c_f.scored_per_layer
    s_f = allocate("activation", 0.5, counts=c_f.layer_counts, layer_sizes=sizes)
    s_shared = allocate("activation", 0.5, counts=c_b_shared.layer_counts, layer_sizes=sizes)
    s_own = allocate("activation", 0.5, counts=c_b_own.layer_counts, layer_sizes=sizes)
    state["compare"] = {
        "matrices": len(errs),
        "rel_frobenius_median": statistics.median(errs.values()),
        "rel_frobenius_worst": errs[worst], "worst_matrix": worst,
        "rel_frobenius_median_by_type": {t: statistics.median(v) for t, v in per_type.items()},
        "gamma_float32_q0.1": gamma_f, "gamma_bfloat16_q0.1": gamma_b,
        "counts_float32": c_f.layer_counts,
        "counts_at_float32_gamma": cmp(c_b_shared, c_f),
        "counts_at_own_gamma": cmp(c_b_own, c_f),
        "top10_overlap_per_layer": overlaps,
        "top10_overlap_min": min(overlaps), "top10_overlap_median": statistics.median(overlaps),
        "S_float32": s_f, "S_bfloat16_at_float32_gamma": s_shared, "S_bfloat16_own_gamma": s_own,
        "max_abs_dS_float32_gamma": max(abs(p - q) for p, q in zip(s_shared, s_f)),
        "max_abs_dS_own_gamma": max(abs(p - q) for p, q in zip(s_own, s_f)),
    }


def prune(args, out: Path, state: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from actpat.data.calibration import calibration_sequences
    from actpat.evaluation.evaluate import load_corpus, perplexity
    from actpat.models.architectures import decoder_layers, scored_matrices
    from actpat.models.loading import load_model
    from actpat.sparsity.layerwise import prune_model

    res = state.setdefault("prune", {})
    corpora = None
    for s in args.sparsities:
        key = f"{s:g}"
        row = res.setdefault(key, {})
        if all(d in row and "wikitext2" in row[d] for d in DTYPES):
            continue
        masks = {}
        for dtype in DTYPES:
            lm = load_model(args.model, dtype=dtype)
            calib = calibration_sequences(lm.tokenizer, "c4", args.calib_samples, args.seq_len,
                                          seed=0, split=args.calib_split)
            n = len(decoder_layers(lm.model))
            rep = prune_model(lm.model, calib.sequences, [s] * n, "wanda",
                              batch_size=args.batch_size, progress=False)
            masks[dtype] = {m.name: (m.weight.detach() == 0) for m in scored_matrices(lm.model)}
            row.setdefault(dtype, {})["prune_s"] = rep["seconds"]
            row[dtype]["calibration"] = {"samples": len(calib.sequences), "source": calib.source}
            del lm
        pruned = sum(int(m.sum()) for m in masks["float32"].values())
        differ = sum(int((masks["float32"][k] ^ masks["bfloat16"][k]).sum())
                     for k in masks["float32"])
        row["mask_disagreement"] = differ / 2 / pruned  # share of pruned positions swapped
        for dtype in DTYPES:
            lm = load_model(args.model, dtype="float32")
            with torch.no_grad():
                for m in scored_matrices(lm.model):
                    m.module.weight.data.masked_fill_(masks[dtype][m.name], 0.0)
            if corpora is None:
                corpora = {c: load_corpus(lm.tokenizer, c) for c in ("wikitext2", "c4")}
            for c, corpus in corpora.items():
                r = perplexity(lm.model, corpus, args.seq_len, args.windows, args.batch_size)
                row[dtype][c] = {"ppl": r["ppl"], "windows": r["windows"],
                                 "tokens_predicted": r["tokens_predicted"],
                                 "source": r["source"]}
            del lm
            save_state(out, state)
        print(json.dumps({key: row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-split", default="train",
                    help="C4 split of the calibration windows (Table 1 uses train)")
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6])
    ap.add_argument("--stages", default="profiles,compare,prune")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    state["settings"] = vars(args)
    for stage in args.stages.split(","):
        t = time.perf_counter()
        {"profiles": profiles, "compare": compare, "prune": prune}[stage](args, out, state)
        state.setdefault("stage_s", {})[stage] = round(time.perf_counter() - t, 1)
        save_state(out, state)
        print(f"{stage} done in {time.perf_counter() - t:.0f}s", flush=True)
    print(json.dumps(state.get("compare", {}), indent=1)[:3000])


if __name__ == "__main__":
    main()
