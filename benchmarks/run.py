"""`make bench`: actpat's profiler against the authors' style of loop and a plain forward+backward.

One driver process runs every variant in its own subprocess (so each variant's peak RSS is its
own), on the same SmolLM2-135M samples (c4 windows from ``$ACTPAT_DATA_DIR``), repeated and
interleaved (repeat 1: all variants, repeat 2: all variants, ...) so that the load of other
processes on a shared machine hits every variant alike; medians and per-repeat ratios are
reported.

Variants (each times ``--samples`` sequences after one untimed warm-up sample):

* ``actpat-bB``: ``actpat.activation.profiling.compute_profile`` at batch size B (hooks, per-sample
  gradients formed batched, only activations require grad).
* ``authors``: the authors' style of loop -- every parameter requires grad, one backward per
  sample on the full logits, a deep copy of grad * w of *every* parameter per sample, then
  |.| accumulated for the scored matrices.
* ``plain-bB``: a plain forward + backward with the same objective (max logit at the last
  token, only the last position projected onto the vocabulary), every weight requiring grad as
  in training, batch B, no per-sample work at all: the practical limit.

Results: ``benchmarks/results/profile-<date>.json`` and a dated section appended to
``BENCHMARKS.md``. Run ``python benchmarks/run.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- memory probes


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


# --------------------------------------------------------------------------- variants (worker side)


def _authors_loop(model, sequences, mats):
    """Every parameter requires grad; per sample: backward, deep copy of grad*w, accumulate |.|."""
    import torch

    for p in model.parameters():
        p.requires_grad_(True)
    scored = {m.name + ".weight" for m in mats}
    sums = {}
    for seq in sequences:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq])
        f = model(input_ids=ids, use_cache=False).logits[0, -1].max()
        f.backward()
        per_sample = {n: copy.deepcopy(p.grad * p.data) for n, p in model.named_parameters()
                      if p.grad is not None}
        for n, a in per_sample.items():
            if n in scored:
                a = a.abs()
                sums[n] = sums[n] + a if n in sums else a
        del per_sample
    model.zero_grad(set_to_none=True)
    return sums


def _plain(model, sequences, batch_size):
    """Forward + backward of the batch's summed max-logit objective, weights requiring grad."""
    import torch

    for p in model.parameters():
        p.requires_grad_(True)
    for i in range(0, len(sequences), batch_size):
        ids = torch.tensor(sequences[i:i + batch_size])  # equal-length windows: no padding
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        out.logits[:, -1].float().max(-1).values.sum().backward()
    model.zero_grad(set_to_none=True)


def worker(variant: str, seq_len: int, samples: int, seed: int) -> dict:
    import torch

    from actpat.data.datasets import sample_sequences
    from actpat.models.architectures import scored_matrices
    from actpat.models.loading import load_model
    from actpat.activation.profiling import compute_profile

    lm = load_model("smollm2-135m", "cpu", "float32")
    data = sample_sequences(lm.tokenizer, "c4", samples + 1, seq_len, seed)
    warm, seqs = data.sequences[:1], data.sequences[1:]
    mats = scored_matrices(lm.model)
    kind, _, b = variant.partition("-b")
    batch = int(b) if b else 1

    def run(sequences):
        if kind == "actpat":
            compute_profile(lm, sequences, batch, progress=False)
        elif kind == "authors":
            _authors_loop(lm.model, sequences, mats)
        elif kind == "plain":
            _plain(lm.model, sequences, batch)
        else:
            raise SystemExit(f"unknown variant {variant}")

    run(warm)  # untimed: first-call allocations and thread-pool start
    base = rss_mb()
    resettable = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    run(seqs)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {"variant": variant, "seq_len": seq_len, "samples": len(seqs), "batch_size": batch,
            "wall_s": wall, "s_per_sample": wall / len(seqs),
            "cpu_s": cpu, "cpu_s_per_sample": cpu / len(seqs),
            "ms_per_token": 1000 * wall / (len(seqs) * seq_len),
            "rss_before_mb": round(base, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_is_timed_phase": resettable,
            "threads": torch.get_num_threads(), "load_after": os.getloadavg()}


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    import torch
    import transformers

    from actpat import __version__

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(total / 2**20, 1),
            "commit": commit,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "actpat": __version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def run_variant(variant: str, seq_len: int, samples: int, seed: int, timeout: int,
                threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--seq-len", str(seq_len),
           "--samples", str(samples), "--seed", str(seed)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "seq_len": seq_len, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], variants: list[str], seq_lens: list[int]) -> dict:
    """Medians per (variant, seq len) and medians of per-repeat ratios."""
    out = {}
    for t in seq_lens:
        cell = {}
        for v in variants:
            ok = [r for r in rows if r["variant"] == v and r["seq_len"] == t and "error" not in r]
            if ok:
                keys = ["s_per_sample", "ms_per_token", "peak_rss_mb"]
                if all("cpu_s_per_sample" in r for r in ok):
                    keys.append("cpu_s_per_sample")
                cell[v] = {k: statistics.median(r[k] for r in ok) for k in keys}
                cell[v]["repeats"] = len(ok)
        ratios = {}
        repeats = sorted({r["repeat"] for r in rows})

        def per_repeat(a: str, b: str, key: str = "s_per_sample"):
            vals = []
            for k in repeats:
                ra = [r for r in rows if r["variant"] == a and r["seq_len"] == t
                      and r["repeat"] == k and "error" not in r]
                rb = [r for r in rows if r["variant"] == b and r["seq_len"] == t
                      and r["repeat"] == k and "error" not in r]
                if ra and rb:
                    vals.append(ra[0][key] / rb[0][key])
            return round(statistics.median(vals), 3) if vals else None

        actpats = [v for v in variants if v.startswith("actpat")]
        plains = [v for v in variants if v.startswith("plain")]
        cpu = all("cpu_s_per_sample" in r for r in rows if "error" not in r)
        for a in actpats:
            ratios[f"{a}/authors"] = per_repeat(a, "authors")
            if cpu:
                ratios[f"cpu {a}/authors"] = per_repeat(a, "authors", "cpu_s_per_sample")
            same_b = "plain-b" + a.split("-b")[1]
            if same_b in plains:
                ratios[f"{a}/{same_b}"] = per_repeat(a, same_b)
                if cpu:
                    ratios[f"cpu {a}/{same_b}"] = per_repeat(a, same_b, "cpu_s_per_sample")
        if cell:
            best_a = min((v for v in actpats if v in cell), key=lambda v: cell[v]["s_per_sample"],
                         default=None)
            best_p = min((v for v in plains if v in cell), key=lambda v: cell[v]["s_per_sample"],
                         default=None)
            if best_a and best_p:
                ratios["best_actpat/best_plain"] = round(
                    cell[best_a]["s_per_sample"] / cell[best_p]["s_per_sample"], 3)
                ratios["best_actpat"] = best_a
                ratios["best_plain"] = best_p
            if cpu:
                ca = min((v for v in actpats if v in cell),
                         key=lambda v: cell[v]["cpu_s_per_sample"], default=None)
                cp = min((v for v in plains if v in cell),
                         key=lambda v: cell[v]["cpu_s_per_sample"], default=None)
                if ca and cp:
                    ratios["cpu best_actpat/best_plain"] = round(
                        cell[ca]["cpu_s_per_sample"] / cell[cp]["cpu_s_per_sample"], 3)
                    ratios["cpu best_actpat"], ratios["cpu best_plain"] = ca, cp
            if "actpat-b1" in cell and "authors" in cell:
                ratios["peak_rss actpat-b1/authors"] = per_repeat("actpat-b1", "authors",
                                                                  "peak_rss_mb")
        out[str(t)] = {"medians": cell, "ratios": ratios}
    return out


def targets(summary: dict) -> dict:
    """The issue's targets at 256 tokens, checked on the medians."""
    s = summary.get("256")
    if not s:
        return {}
    r = s["ratios"]
    out = {}
    for kind, prefix in (("wall", ""), ("cpu", "cpu ")):
        speedup = [1 / v for k, v in r.items() if k.startswith(prefix + "actpat")
                   and k.endswith("/authors") and v]
        if not speedup:
            continue
        out[f">=2x faster than authors, {kind} time (best batch)"] = max(speedup) >= 2.0
        out[f"<=1.15x of plain fwd+bwd, {kind} time (best vs best)"] = \
            (r.get(prefix + "best_actpat/best_plain") or 99) <= 1.15
    if r.get("peak_rss actpat-b1/authors") is not None:
        out["batch 1 peak RSS <= 0.8x authors"] = r["peak_rss actpat-b1/authors"] <= 0.8
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"\n## Profiling speed, {result['date']} (benchmarks/run.py)\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['platform']}; "
             f"Python {m['python']}, torch {m['torch']} (threads per variant: "
             f"{result.get('threads_per_variant', m['torch_threads'])}), "
             f"transformers {m['transformers']}, actpat {m['actpat']} "
             f"(commit {m.get('commit', '?')}). "
             f"Model SmolLM2-135M (float32), {result['samples']} c4 windows per variant after one "
             f"warm-up, {result['repeats']} interleaved repeats, medians. Load average at start / "
             f"end: {result['load_start']} / {result['load_end']} (other workers share the "
             f"cores). Wall time of the whole benchmark: {result['total_s']:.0f} s"
             + (" (cut short: only the finished variant runs are summarised)"
                if result.get("cut_short") else "") + ". "
             "CPU s/sample is the variant process' CPU time (user + sys) over the timed phase: "
             "with one thread per process it is the measure least disturbed by other work on "
             "the machine; wall times on a crowded machine mostly measure the crowd.\n"]
    for t, s in result["summary"].items():
        lines.append(f"\n**{t} tokens**\n\n| variant | s/sample (wall) | ms/token (wall) | "
                     "CPU s/sample | peak RSS (MB) |\n| --- | ---: | ---: | ---: | ---: |")
        for v, c in s["medians"].items():
            cpu = f"{c['cpu_s_per_sample']:.3f}" if "cpu_s_per_sample" in c else "-"
            lines.append(f"| {v} | {c['s_per_sample']:.3f} | {c['ms_per_token']:.2f} | {cpu} | "
                         f"{c['peak_rss_mb']:.0f} |")
        rat = ", ".join(f"{k} = {v}" for k, v in s["ratios"].items())
        lines.append(f"\nRatios (median over repeats of per-repeat ratios of s/sample unless named): "
                     f"{rat}.\n")
    if result["targets"]:
        lines.append("Targets at 256 tokens: " + "; ".join(
            f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()) + ".\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="256,128")
    p.add_argument("--samples", type=int, default=8, help="timed samples per variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="actpat-b1,actpat-b4,actpat-b8,authors,plain-b1,plain-b4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1200, help="per variant run, seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per variant process (default: torch's choice); 1 avoids "
                        "spinning OpenMP threads on a machine crowded by other work")
    p.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--summarise", default=None, metavar="JSON",
                   help="only summarise an earlier (possibly cut short) results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len, args.samples, args.seed)))
        return 0

    if args.summarise:
        return finish(json.loads(Path(args.summarise).read_text()), Path(args.summarise),
                      not args.no_markdown)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    variants = args.variants.split(",")
    date = dt.datetime.now(dt.timezone.utc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile-{date:%Y%m%dT%H%M}.json"
    result = {"date": date.isoformat(timespec="seconds"), "machine": machine(),
              "threads_per_variant": args.threads or "default", "samples": args.samples,
              "repeats": args.repeats, "variants": variants,
              "seq_lens": seq_lens, "load_start": [round(x, 2) for x in os.getloadavg()],
              "rows": []}
    start = time.perf_counter()
    for t in seq_lens:  # one sequence length at a time, so a cut-short run has whole tables
        for k in range(args.repeats):
            for v in variants:
                row = run_variant(v, t, args.samples, args.seed, args.timeout, args.threads)
                row["repeat"] = k
                result["rows"].append(row)
                msg = row.get("error", "").splitlines()[-1:] or \
                    [f"{row['s_per_sample']:.3f} s/sample, peak {row['peak_rss_mb']:.0f} MB"]
                print(f"[repeat {k + 1}/{args.repeats}] {t} tokens {v:>10}: {msg[0]}", flush=True)
                out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
    result["total_s"] = time.perf_counter() - start
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    return finish(result, out, not args.no_markdown)


def finish(result: dict, out: Path, append: bool) -> int:
    """Summarise the rows (all there are), write the JSON, append the Markdown section."""
    variants, seq_lens = result["variants"], result["seq_lens"]
    if "total_s" not in result:  # a run cut short: summarise what finished
        result["cut_short"] = True
        result["total_s"] = float("nan")
        result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    seq_lens = [t for t in seq_lens if any(r["seq_len"] == t for r in result["rows"])]
    result["summary"] = summarise(result["rows"], variants, seq_lens)
    result["targets"] = targets(result["summary"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if append:
        bench = ROOT / "BENCHMARKS.md"
        if not bench.exists():
            bench.write_text("# Benchmarks\n\nMeasured results, newest sections last.\n")
        with bench.open("a") as f:
            f.write(text)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
