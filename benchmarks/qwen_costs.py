"""Per-unit costs of actpat's main steps on one model, float32 against bfloat16 (BENCHMARKS.md).

One child process per dtype, run one after the other (same machine state), each with one torch
thread. Each child measures, after a warm-up:

* profiling (max-logit objective) of C4 validation windows of ``--seq-len`` tokens at batch
  sizes 1 and 2: seconds per sample;
* perplexity: seconds per window of ``--seq-len`` tokens (WikiText-2 test, batch 4);
* zero-shot: seconds per item of boolq and of piqa (lm-eval ``HFLM``, first ``--items`` items);
* Wanda and SparseGPT, uniform 50%, with C4 train calibration windows at two sizes
  (``--calib``, e.g. 8 and 16): the time is fitted as a + b * n and extrapolated to
  ``--target-calib`` (64) windows — the calibration forward passes grow with n, the per-matrix
  mask / solve does not.

Peak RSS is the child's ``ru_maxrss``. Usage:

    python benchmarks/qwen_costs.py --model path/to/model.gguf --json costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def child(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from actpat.data.calibration import calibration_sequences
    from actpat.data.datasets import sample_sequences
    from actpat.evaluation.evaluate import load_corpus, window_nll, zero_shot
    from actpat.models.loading import load_model
    from actpat.activation.profiling import compute_profile
    from actpat.sparsity.layerwise import prune_model

    out: dict = {"dtype": args.dtype, "seq_len": args.seq_len}
    t = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype)
    out["load_s"] = round(time.perf_counter() - t, 2)
    n_layers = len(lm.model.model.layers) if hasattr(lm.model, "model") else None

    # profiling
    seqs = sample_sequences(lm.tokenizer, "c4", 1 + 2 * args.profile_samples, args.seq_len,
                            seed=0).sequences
    compute_profile(lm, seqs[:1], 1, progress=False)  # warm-up
    prof = {}
    for b in (1, 2):
        chunk = seqs[1:1 + 2 * args.profile_samples] if b == 2 else seqs[1:1 + args.profile_samples]
        t, c = time.perf_counter(), time.process_time()
        compute_profile(lm, chunk, b, progress=False)
        prof[f"batch{b}"] = {"samples": len(chunk),
                             "s_per_sample": round((time.perf_counter() - t) / len(chunk), 3),
                             "cpu_s_per_sample": round((time.process_time() - c) / len(chunk), 3)}
    out["profile"] = prof

    # perplexity
    corpus = load_corpus(lm.tokenizer, "wikitext2")
    window_nll(lm.model, corpus.ids, args.seq_len, 1, 1)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    _, n, _ = window_nll(lm.model, corpus.ids, args.seq_len, args.windows, 4)
    out["perplexity"] = {"windows": n, "batch": 4,
                         "s_per_window": round((time.perf_counter() - t) / n, 3),
                         "cpu_s_per_window": round((time.process_time() - c) / n, 3)}

    # zero-shot
    zs = {}
    for task in args.tasks.split(","):
        t, c = time.perf_counter(), time.process_time()
        r = zero_shot(lm.model, lm.tokenizer, [task], limit=args.items, batch_size=4)
        zs[task] = {"items": r[task]["n"],
                    "s_per_item": round((time.perf_counter() - t) / r[task]["n"], 3),
                    "cpu_s_per_item": round((time.process_time() - c) / r[task]["n"], 3)}
    out["zero_shot"] = zs

    # pruning, two calibration sizes, extrapolated
    sizes = [int(x) for x in args.calib.split(",")]
    pr = {}
    for pruner in ("wanda", "sparsegpt"):
        pts = []
        for n in sizes:
            lm = load_model(args.model, dtype=args.dtype)  # a fresh dense model
            calib = calibration_sequences(lm.tokenizer, "c4", n, args.seq_len, seed=0).sequences
            c = time.process_time()
            rep = prune_model(lm.model, calib, [0.5] * len(lm.model.model.layers), pruner,
                              batch_size=8, progress=False)
            pts.append((n, rep["seconds"], time.process_time() - c))
            del lm
        rec = {"measured": [{"calib": n, "s": round(s, 1), "cpu_s": round(c, 1)}
                            for n, s, c in pts]}
        for key, col in (("wall", 1), ("cpu", 2)):
            (n1, t1), (n2, t2) = (pts[0][0], pts[0][col]), (pts[-1][0], pts[-1][col])
            b = (t2 - t1) / (n2 - n1) if n2 != n1 else t1 / n1
            a = t1 - b * n1
            rec[key] = {"fit_a_s": round(a, 1), "fit_b_s_per_window": round(b, 2),
                        f"minutes_at_{args.target_calib}":
                            round((a + b * args.target_calib) / 60, 2)}
        pr[pruner] = rec
    out["prune"] = pr
    out["layers"] = n_layers
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--dtype", help=argparse.SUPPRESS)  # child
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--profile-samples", type=int, default=2, help="per batch size")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--tasks", default="boolq,piqa")
    ap.add_argument("--calib", default="8,16", help="two calibration sizes for the fit")
    ap.add_argument("--target-calib", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.dtype:
        print(json.dumps(child(args)))
        return
    results = {"model": args.model, "machine": platform.platform(), "cpus": os.cpu_count(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_before": os.getloadavg(), "runs": []}
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", dtype,
               "--seq-len", str(args.seq_len), "--profile-samples", str(args.profile_samples),
               "--windows", str(args.windows), "--items", str(args.items),
               "--tasks", args.tasks, "--calib", args.calib,
               "--target-calib", str(args.target_calib)]
        t = time.perf_counter()
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        run = json.loads(line.strip().splitlines()[-1])
        run["wall_s"] = round(time.perf_counter() - t, 1)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if args.json:  # after each dtype, so a killed run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    results["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
