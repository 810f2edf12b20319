"""GPU benchmark (run through benchmarks/gpu.sh): a random Llama-2-7B-shaped model in bf16.

No download, no network: the model is built from a config with random weights, the tokens are
random ids. Measures, on one GPU:

* profiling throughput (tokens/s) of actpat's batched per-sample metric against a plain
  forward+backward of the same objective over the same tokens, batch sizes 1-16 at 512 tokens;
* Wanda pruning wall time (actpat.sparsity.layerwise) for all 32 layers with 128 x 2048 calibration tokens;
* peak GPU memory of each phase.

``--tiny`` runs the same code on a toy shape on CPU in seconds (the tests use it). Results go to
``benchmarks/results/gpu-<date>.json``; on a GPU a section is appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" \
        else None


def build(shape: dict, dtype, device):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**shape)
    with torch.device(device):
        model = tf.LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def bench_profile(model, device, batch_sizes, seq_len, steps, vocab):
    from actpat.activation.metric import MeanAccumulator, score_batch
    from actpat.models.architectures import scored_matrices

    mats = scored_matrices(model)
    rows = []
    for b in batch_sizes:
        ids = torch.randint(3, vocab, (b, seq_len), device=device)
        mask = torch.ones_like(ids)
        row = {"batch_size": b, "seq_len": seq_len}
        for kind in ("actpat", "plain"):
            acc = MeanAccumulator()
            try:
                for step in range(steps + 1):  # step 0: warm-up, untimed
                    if step == 1:
                        sync(device)
                        reset_peak(device)
                        start = time.perf_counter()
                    if kind == "actpat":
                        score_batch(model, ids, mask, [acc], "max-logit", mats)
                    else:
                        _plain_step(model, ids)
                sync(device)
                wall = (time.perf_counter() - start) / steps
                row[kind] = {"s_per_batch": round(wall, 4),
                             "tokens_per_s": round(b * seq_len / wall, 1),
                             "peak_gb": peak_gb(device)}
            except torch.OutOfMemoryError:
                row[kind] = {"error": "out of memory"}
            del acc
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "s_per_batch" in row["actpat"] and "s_per_batch" in row["plain"]:
            row["actpat/plain"] = round(row["actpat"]["s_per_batch"] /
                                        row["plain"]["s_per_batch"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _plain_step(model, ids):
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    out.logits[:, -1].float().max(-1).values.sum().backward()


def bench_wanda(model, device, n, seq_len, vocab, batch_size):
    from actpat.sparsity.layerwise import model_sparsity, prune_model

    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, vocab, (n, seq_len), generator=g).tolist()
    layers = model.config.num_hidden_layers
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    report = prune_model(model, calib, [0.5] * layers, "wanda", "unstructured",
                         batch_size=batch_size, progress=False)
    sync(device)
    wall = time.perf_counter() - start
    return {"layers": layers, "calibration": f"{n} x {seq_len}", "wall_s": round(wall, 2),
            "peak_gb": peak_gb(device), "achieved_sparsity": round(model_sparsity(model), 4),
            "reported_seconds": report.get("seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy shape on CPU (checks the script)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/)")
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY if args.tiny else LLAMA2_7B
    dtype = torch.bfloat16 if cuda else torch.float32
    plan = dict(batch_sizes=[1, 2] if args.tiny else [1, 2, 4, 8, 16],
                seq_len=32 if args.tiny else 512, steps=1 if args.tiny else 2,
                calib_n=4 if args.tiny else 128, calib_len=64 if args.tiny else 2048,
                calib_batch=2 if args.tiny else 8)
    if not cuda and not args.tiny:
        print("no CUDA GPU visible: run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    date = dt.datetime.now(dt.timezone.utc)
    result = {"date": date.isoformat(timespec="seconds"), "tiny": args.tiny, "shape": shape,
              "dtype": str(dtype), "plan": plan, "device": torch.cuda.get_device_name(0)
              if cuda else platform.processor() or "cpu", "torch": torch.__version__,
              "python": platform.python_version()}
    import transformers

    result["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    model = build(shape, dtype, device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"gpu-{'tiny-' if args.tiny else ''}{date:%Y%m%dT%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["profiling"] = bench_profile(model, device, plan["batch_sizes"], plan["seq_len"],
                                        plan["steps"], shape["vocab_size"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        result["wanda"] = bench_wanda(model, device, plan["calib_n"], plan["calib_len"],
                                      shape["vocab_size"], plan["calib_batch"])
    except ImportError as e:
        result["wanda"] = {"error": f"actpat.sparsity.layerwise unavailable: {e}"}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["wanda"]))
    if cuda and not args.no_markdown:
        with (ROOT / "BENCHMARKS.md").open("a") as f:
            f.write(markdown(result))
    print(f"results: {out}")
    return 0


def markdown(r: dict) -> str:
    lines = [f"\n## GPU: profiling and Wanda on a random Llama-2-7B shape, {r['date']} "
             "(benchmarks/gpu.sh)\n",
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, "
             f"{r['parameters'] / 1e9:.2f} B parameters, random weights and tokens.\n",
             "| batch | seq | actpat tokens/s | plain fwd+bwd tokens/s | actpat/plain time | "
             "actpat peak GB | plain peak GB |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["profiling"]:
        a, p = row["actpat"], row["plain"]
        lines.append(f"| {row['batch_size']} | {row['seq_len']} | {a.get('tokens_per_s', a.get('error'))} "
                     f"| {p.get('tokens_per_s', p.get('error'))} | {row.get('actpat/plain', '-')} "
                     f"| {a.get('peak_gb', '-')} | {p.get('peak_gb', '-')} |")
    w = r.get("wanda", {})
    lines.append(f"\nWanda, 50% unstructured, {w.get('layers')} layers, calibration "
                 f"{w.get('calibration')} tokens: {w.get('wall_s')} s, peak {w.get('peak_gb')} GB "
                 f"(achieved sparsity {w.get('achieved_sparsity')}). Total script time "
                 f"{r['total_s']} s.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
