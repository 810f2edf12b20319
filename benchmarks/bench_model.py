"""Speed, size and memory of saved checkpoints with plain transformers on CPU, in one run.

    python benchmarks/bench_model.py DENSE_DIR PRUNED_DIR ... [--labels a,b,...]
        [--repeats 3] [--json out.json] [--append BENCHMARKS.md]

For each checkpoint (a Hugging Face directory, e.g. what ``actpat prune --save`` writes, or a
model alias such as ``smollm2-135m``, read from actpat's float32 cache) a fresh child process
loads it with ``AutoModelForCausalLM.from_pretrained`` (float32, one torch thread) and times

* prefill: one forward of P random tokens (``--prefill``, default 256 and 1024), batch 1,
  building the KV cache and computing the last position's logits only (as ``generate``
  does), in tokens/s; the faster of two runs;
* greedy decode: ``generate`` of exactly 128 new tokens after a 32-token prompt, batch 1,
  with the KV cache; tokens/s = 128 / (generate time - the prompt's own prefill time).

Also the file size of its safetensors, its parameters, the share of exactly-zero weights in
its decoder matrices (2-D weights without a vocabulary dimension), and the child's peak RSS
(ru_maxrss: interpreter, torch, weights and the longest forward). Children run model by
model, interleaved over the repeats, so a change in machine load hits every model alike; the
tables give medians, and each speedup is the median over repeats of that repeat's ratio to
the first checkpoint. Wall and CPU (user + sys) time are both recorded: with one thread, CPU
time is the figure least disturbed by other work on a shared machine.

Zeros are stored and multiplied densely: an unstructured or 2:4 sparse model runs at dense
speed here (transformers has no sparse kernel on CPU); only removed layers make it faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFILL = (256, 1024)
PROMPT, NEW = 32, 128


def _resolve(spec: str) -> str:
    if Path(spec).is_dir():
        return spec
    from actpat.models.gguf_cache import gguf_to_safetensors
    from actpat.models.loading import resolve_spec

    path = resolve_spec(spec)
    if path.endswith(".gguf"):
        return gguf_to_safetensors(path)[0]
    raise SystemExit(f"{spec}: not a directory or a GGUF alias")


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def child(directory: str, prefill_lengths=PREFILL) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (1, max(prefill_lengths)), generator=gen)
    # the decoder's matrices: embeddings and the LM head (a vocabulary dimension) are not pruned
    matrices = [p for p in model.parameters() if p.dim() == 2 and vocab not in p.shape]
    out = {"layers": model.config.num_hidden_layers,
           "parameters": sum(p.numel() for p in model.parameters()),
           "zero_share": sum(int((p == 0).sum()) for p in matrices)
           / sum(p.numel() for p in matrices),
           "file_mb": sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 2**20}

    def prefill(n):
        return lambda: model(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        prefill(64)()  # warm-up
        for n in prefill_lengths:  # the faster of two runs
            times = [_timed(prefill(n)) for _ in range(2)]
            out[f"prefill_{n}"] = {"wall_s": min(t[0] for t in times),
                                   "cpu_s": min(t[1] for t in times)}
        prompt = ids[:, :PROMPT]
        wall_p, cpu_p = min(_timed(prefill(PROMPT)) for _ in range(2))
        res = {}

        def decode():
            res["ids"] = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=NEW, min_new_tokens=NEW,
                                        do_sample=False, pad_token_id=0)
        wall, cpu = _timed(decode)
        assert res["ids"].shape[1] == PROMPT + NEW
        out["decode"] = {"wall_s": wall - wall_p, "cpu_s": cpu - cpu_p}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _rate(tokens: int, entry: dict, key: str) -> float:
    return tokens / entry[key] if entry[key] > 0 else float("nan")


def summarize(labels: list[str], runs: list[list[dict]], prefill_lengths=PREFILL) -> list[dict]:
    """Per checkpoint: medians over repeats, speedups as medians of per-repeat ratios."""
    rows = []
    phases = [(f"prefill_{n}", n) for n in prefill_lengths] + [("decode", NEW)]
    for i, label in enumerate(labels):
        row = {"label": label, **{k: runs[0][i][k] for k in
                                  ("layers", "parameters", "zero_share", "file_mb")},
               "peak_rss_mb": max(r[i]["peak_rss_mb"] for r in runs)}
        for phase, tokens in phases:
            for key in ("wall_s", "cpu_s"):
                rates = [_rate(tokens, r[i][phase], key) for r in runs]
                ratios = [_rate(tokens, r[i][phase], key) / _rate(tokens, r[0][phase], key)
                          for r in runs]
                row[f"{phase}_{key[:-2]}_tok_s"] = statistics.median(rates)
                row[f"{phase}_{key[:-2]}_speedup"] = statistics.median(ratios)
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lengths = meta["prefill"]
    phases = [f"prefill_{n}" for n in lengths] + ["decode"]
    heads = [f"prefill {n} tok/s" for n in lengths] + ["decode tok/s"]
    speed_head = "speedup " + " / ".join([str(n) for n in lengths] + ["decode"])

    def rates(r, kind):
        cells = [f"{r[f'{ph}_{kind}_tok_s']:.{1 if ph == 'decode' else 0}f}" for ph in phases]
        ups = " / ".join(f"{r[f'{ph}_{kind}_speedup']:.2f}" for ph in phases)
        return " | ".join(cells) + f" | {ups}"

    lines = [f"## Checkpoint speed, {meta['date']} (benchmarks/bench_model.py)", "",
             f"Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']} "
             f"(1 thread), transformers {meta['transformers']}. float32, batch 1, "
             f"{meta['repeats']} interleaved repeats, medians; speedup = median per-repeat "
             f"ratio to `{rows[0]['label']}`. Load average at start / end: "
             f"{meta['load_start']} / {meta['load_end']}. Wall time of the whole run: "
             f"{meta['wall_s']:.0f} s.", "",
             "CPU time (user + sys of the one-thread child; the figure least disturbed by "
             "other jobs):", "",
             "| checkpoint | layers | params (M) | zeros in decoder matrices | file (MB) | "
             "peak RSS (MB) | "
             + " | ".join(heads) + f" | {speed_head} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(heads) + "--- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['layers']} | {r['parameters'] / 1e6:.1f} | "
                     f"{r['zero_share']:.3f} | {r['file_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{rates(r, 'cpu')} |")
    lines += ["", "Wall time (what a user waits; disturbed by the machine's load):", "",
              "| checkpoint | " + " | ".join(heads) + f" | {speed_head} |",
              "| --- | " + "---: | " * len(heads) + "--- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {rates(r, 'wall')} |")
    lines += ["", "Zeros are stored and multiplied densely: the unstructured and 2:4 models "
              "run at dense speed with these dense kernels; only removing layers makes a "
              "model faster here.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="time saved checkpoints (prefill, decode, memory)")
    p.add_argument("models", nargs="*", help="checkpoint directories (the first is the baseline)")
    p.add_argument("--labels", default=None, help="comma-separated names, one per model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", default="256,1024", help="prompt lengths timed for prefill")
    p.add_argument("--json", default=None)
    p.add_argument("--append", default=None, help="append the markdown section to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = tuple(int(x) for x in args.prefill.split(","))
    if args.child:
        print(json.dumps(child(args.child, lengths)))
        return
    if not args.models:
        p.error("give at least one checkpoint")
    dirs = [_resolve(m) for m in args.models]
    labels = args.labels.split(",") if args.labels else [Path(m).name for m in args.models]
    if len(labels) != len(dirs):
        p.error("--labels needs one name per model")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    start, load_start = time.perf_counter(), os.getloadavg()
    runs = []
    for rep in range(args.repeats):
        runs.append([])
        for label, d in zip(labels, dirs):
            res = subprocess.run([sys.executable, __file__, "--child", d, "--prefill",
                                  args.prefill], env=env,
                                 capture_output=True, text=True, check=True)
            runs[-1].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"repeat {rep}: {label} done", file=sys.stderr, flush=True)
    import torch
    import transformers

    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "repeats": args.repeats,
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": time.perf_counter() - start, "prefill": lengths,
            "models": dict(zip(labels, args.models))}
    rows = summarize(labels, runs, lengths)
    text = markdown(rows, meta)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs},
                                              indent=2) + "\n")
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
