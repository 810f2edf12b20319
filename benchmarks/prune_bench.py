"""Pruning wall time and peak memory per pruner on SmolLM2-135M (issue 4, "Measured").

Each pruner runs in its own subprocess (so each peak RSS is its own): load the model (cached
float32 copy), draw the calibration windows (c4 train, ``--samples`` x ``--seq-len`` tokens,
seed 0), then ``actpat.sparsity.layerwise.prune_model`` at 50% unstructured sparsity (uniform), timed.
Reported per pruner: prune wall and CPU time, the peak RSS (VmHWM) while pruning (the counter
is reset after loading, through /proc/self/clear_refs), the RSS just before pruning (model +
calibration data) and the peak of the loading phase.

Results: ``benchmarks/results/prune-<date>.json`` and a dated section appended to
``BENCHMARKS.md``. Usage: ``nice -n 5 python benchmarks/prune_bench.py [--samples 128]
[--seq-len 256] [--pruners magnitude,wanda,sparsegpt] [--timeout 900]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _cpu_s() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from actpat.data.calibration import calibration_sequences
    from actpat.models.loading import load_model
    from actpat.sparsity.layerwise import prune_model

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = calibration_sequences(lm.tokenizer, "c4", args.samples, args.seq_len, 0, "train",
                                    args.data_dir)
    calib_s = time.perf_counter() - t0
    rss_before = _status_mb("VmRSS")
    process_peak = _status_mb("VmHWM")
    try:  # reset the peak (VmHWM) so that it measures pruning alone
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    n_layers = len(lm.model.model.layers)
    t0, c0 = time.perf_counter(), _cpu_s()
    report = prune_model(lm.model, samples.sequences, [args.sparsity] * n_layers, args.worker,
                         batch_size=args.batch_size, progress=False)
    prune_s, cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    print(json.dumps({
        "pruner": args.worker, "prune_s": round(prune_s, 2), "prune_cpu_s": round(cpu_s, 2),
        "load_s": round(load_s, 2),
        "calibration_s": round(calib_s, 2), "rss_before_prune_mb": round(rss_before),
        "peak_rss_mb": round(_status_mb("VmHWM")), "peak_is_pruning_only": reset,
        "load_peak_rss_mb": round(process_peak),
        "achieved": round(report["achieved_sparsity"], 6),
        "threads": torch.get_num_threads(),
    }))


def driver(args) -> None:
    results = []
    started = dt.datetime.now(dt.timezone.utc)
    meta = {"date": started.isoformat(timespec="seconds"), "samples": args.samples,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "sparsity": args.sparsity,
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "threads": args.threads or "torch default"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"prune-{started:%Y%m%dT%H%M}.json"  # rewritten after every pruner
    for pruner in args.pruners.split(","):
        cmd = [sys.executable, __file__, "--worker", pruner, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--sparsity", str(args.sparsity), "--threads", str(args.threads)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            row = json.loads(line[-1]) if line else {"pruner": pruner,
                                                     "error": out.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"pruner": pruner, "error": f"timed out after {args.timeout}s"}
        row["process_s"] = round(time.perf_counter() - t0, 1)
        row["load_avg_before"] = round(load, 2)
        row["load_avg_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(row), flush=True)
        results.append(row)
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    append_markdown(meta, results)
    print(f"wrote {path} and a section of BENCHMARKS.md")


def append_markdown(meta: dict, results: list[dict]) -> None:
    lines = [
        "",
        f"## Pruning: wall time and peak memory per pruner ({meta['date'][:10]})",
        "",
        f"SmolLM2-135M (float32, CPU, {meta['cpus']} cores shared with other jobs), "
        f"{meta['samples']} x {meta['seq_len']} calibration tokens (c4 train, seed 0), "
        f"{meta['sparsity']:.0%} unstructured, uniform, batch {meta['batch_size']}, "
        f"torch threads: {meta['threads']}; "
        "one run per pruner, each in its own process (`benchmarks/prune_bench.py`).",
        "",
        "| pruner | prune wall time (s) | prune CPU time (s) | peak RSS while pruning (MB) | "
        "RSS before pruning (MB) | peak RSS while loading (MB) | achieved | "
        "load avg before / after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['pruner']} | — ({r['error'][:80]}) | | | | | | "
                         f"{r['load_avg_before']} / {r['load_avg_after']} |")
            continue
        lines.append(f"| {r['pruner']} | {r['prune_s']:.1f} | {r['prune_cpu_s']:.1f} | "
                     f"{r['peak_rss_mb']} | {r['rss_before_prune_mb']} | "
                     f"{r['load_peak_rss_mb']} | {r['achieved']:.4f} | "
                     f"{r['load_avg_before']} / {r['load_avg_after']} |")
    lines += ["", "Timing on 2 shared cores is noisy (see the load averages): read the "
              "ratios between pruners, not the absolute seconds.", ""]
    with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pruners", default="magnitude,wanda,sparsegpt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pruner")
    p.add_argument("--data-dir", default=os.environ.get("ACTPAT_DATA_DIR"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
