"""Similarity cost vs profiling cost, and memory flat in the number of pairs (issue 3).

Runs, each in a fresh child process (so its peak RSS is its own):
  profile 2N samples (``compute_profile``) and similarity of N pairs (``pair_similarity``)
for two values of N, on the same C4 windows of SmolLM2-135M, and appends a section to
BENCHMARKS.md: seconds per sample / per pair, their ratio, and each run's peak RSS.

    python benchmarks/similarity_bench.py [--pairs 2 6] [--seq-len 64] [--threads 1]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kind: str, n: int, seq_len: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from actpat.data.datasets import sample_sequences
    from actpat.models.loading import load_model
    from actpat.activation.profiling import compute_profile
    from actpat.analysis.similarity import pair_similarity

    lm = load_model("smollm2-135m", "cpu")
    seqs = sample_sequences(lm.tokenizer, "c4", 2 * n, seq_len, 0).sequences
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu0 = time.perf_counter(), time.process_time()
    if kind == "profile":
        compute_profile(lm, seqs, batch_size=4, progress=False)
    else:
        pair_similarity(lm, list(zip(seqs[:n], seqs[n:])), pairs_per_batch=2)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"kind": kind, "n": n, "samples": 2 * n, "seconds": seconds, "cpu_seconds": cpu,
            "rss_before_mb": round(base_rss),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.seq_len, args.threads)))
        return 0
    rows = []
    for n in args.pairs:
        for kind in ("profile", "similarity"):
            cmd = [sys.executable, __file__, "--child", kind, str(n), "--seq-len",
                   str(args.seq_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=dict(os.environ, TQDM_DISABLE="1"))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    lines = [
        "",
        f"## Pair similarity vs profiling (SmolLM2-135M, C4 windows of {args.seq_len} tokens)",
        "",
        f"`python benchmarks/similarity_bench.py --pairs {' '.join(map(str, args.pairs))} "
        f"--seq-len {args.seq_len}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {args.threads or 'default'}, load average {load:.1f} at the end "
        "(shared machine: wall times are noisy; CPU time is the steadier figure).",
        "",
        "| N pairs | profile 2N samples: wall / CPU (s) | similarity N pairs: wall / CPU (s) | "
        "CPU ratio sim/profile | CPU s per pair | peak RSS profile (MB) | "
        "peak RSS similarity (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in args.pairs:
        p = next(r for r in rows if r["n"] == n and r["kind"] == "profile")
        s = next(r for r in rows if r["n"] == n and r["kind"] == "similarity")
        lines.append(f"| {n} | {p['seconds']:.1f} / {p['cpu_seconds']:.1f} | "
                     f"{s['seconds']:.1f} / {s['cpu_seconds']:.1f} | "
                     f"{s['cpu_seconds'] / p['cpu_seconds']:.2f} | {s['cpu_seconds'] / n:.2f} | "
                     f"{p['peak_rss_mb']} | {s['peak_rss_mb']} |")
    lines += ["", "Peak RSS includes the model (~0.6 GB as float32) and its loading; profiling "
              "also holds the mean map (~0.4 GB). Similarity keeps only a B x B Gram matrix per "
              "layer, so its peak should not grow with N.", ""]
    with open(args.out, "a") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
