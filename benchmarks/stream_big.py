"""Models larger than memory, measured: write a 7B-shaped random model, then stream it.

    python benchmarks/stream_big.py make DIR [--layers 32] [--hidden 4096] [--intermediate 11008]
    python benchmarks/stream_big.py rss DIR_PREFIX           # peak RSS vs number of layers
    python benchmarks/stream_big.py engines [--model M]      # streamed vs in-memory time

``make`` writes a Llama-style checkpoint (Llama-2-7B dimensions by default: hidden 4096, 32
layers, intermediate 11008, 32 heads; SmolLM2's tokenizer and vocabulary of 49152) with random
weights (normal, std 0.02; norms 1) in bfloat16, one safetensors shard per decoder layer. The
model is never materialised: each layer is created, written and dropped (peak memory: one
layer). Random weights say nothing about quality; they measure memory, time and disk.

The profile / prune / eval runs themselves are ordinary ``actpat`` commands run under
``/usr/bin/time -v`` (see BENCHMARKS.md, "Models larger than memory").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make(out: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
         seed: int = 0) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actpat.models.gguf_cache import gguf_to_safetensors
    from actpat.models.loading import resolve_spec
    from actpat.models.streamed import INDEX_FILE, write_safetensors

    tok_dir, _ = gguf_to_safetensors(resolve_spec("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.dtype = torch.bfloat16
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def fill(shape, name):
        if len(shape) == 1:  # norms
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = layers + 1
    weight_map, total = {}, 0
    state = model.state_dict()
    start = time.perf_counter()
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors = {k: fill(v.shape, k) for k, v in state.items() if k.startswith(prefix)}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(out / name, tensors, {"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        print(f"layer {i + 1}/{layers} written ({time.perf_counter() - start:.0f}s)", flush=True)
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    tensors = {k: fill(v.shape, k) for k, v in state.items() if not k.startswith("model.layers.")}
    total += write_safetensors(out / name, tensors, {"format": "pt"})
    weight_map.update({k: name for k in tensors})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(v.numel() for v in state.values())
    print(f"wrote {params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB bfloat16 -> {out} "
          f"({time.perf_counter() - start:.0f}s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS, file-system inputs."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    fields = {}
    for line in r.stderr.splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    wall = fields.get("Elapsed (wall clock) time (h:mm:ss or m:ss)", "0:0")
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"wall_s": round(seconds, 1),
            "peak_rss_gb": round(int(fields["Maximum resident set size (kbytes)"]) / 1e6, 3),
            "fs_inputs_gb": round(int(fields.get("File system inputs", 0)) * 512 / 1e9, 3),
            "stdout": r.stdout.strip().splitlines()[-1:] }


def rss(prefix: Path, data_dir: str, layer_counts=(4, 8, 16), hidden: int = 1024,
        intermediate: int = 2816):
    """Peak RSS of streamed profile / prune / eval for the same layer shape, more layers
    (c4 samples and calibration, wikitext2 perplexity, from ``data_dir``)."""
    py = sys.executable
    rows = []
    for n in layer_counts:
        d = Path(f"{prefix}-{n}")
        if not (d / "config.json").exists():
            make(d, n, hidden, intermediate, 16, 16)
        common = ["--device", "cpu", "--dtype", "bfloat16", "--quiet", "--data-dir", data_dir]
        runs = {
            "profile": [py, "-m", "actpat", "profile", "--model", str(d), "--dataset",
                        "c4", "--samples", "4", "--seq-len",
                        "128", "--batch-size", "4", "--stream-layers", "--no-cache",
                        "--overwrite", "--out", f"{d}/run-profile", *common],
            "prune": [py, "-m", "actpat", "prune", "--model", str(d), "--sparsity", "0.5",
                      "--calibration", "c4", "--calibration-samples", "8", "--seq-len", "128",
                      "--stream-layers", "--overwrite", "--save", f"{d}/run-pruned", *common],
            "eval": [py, "-m", "actpat", "eval", "--model", f"{d}/run-pruned", "--tasks",
                     "wikitext2", "--limit", "4", "--seq-len", "128", "--stream-layers",
                     *common],
        }
        row = {"layers": n}
        for name, cmd in runs.items():
            row[name] = timed(cmd)
            print(n, name, row[name], flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=2))


def engines(model: str, data_dir: str | None, samples: int = 8, seq_len: int = 128,
            batch: int = 4) -> None:
    """Time per sample of the in-memory and the streamed profile of ``model``, one process
    (c4 windows from ``data_dir``; without it the packaged prose probes, shorter texts)."""
    from actpat.activation.profiling import compute_profile
    from actpat.activation.streaming import profile_streamed
    from actpat.data.datasets import sample_sequences
    from actpat.models.loading import load_model
    from actpat.models.streamed import open_streamed
    import tempfile

    torch.set_num_threads(1)
    lm = load_model(model)
    dataset = "c4" if data_dir else str(ROOT / "actpat/probes/prose.txt")
    seqs = sample_sequences(lm.tokenizer, dataset, samples, seq_len, 0,
                            data_dir=data_dir).sequences
    compute_profile(lm, seqs[:batch], batch, progress=False)  # warm-up
    t = time.perf_counter()
    ref = compute_profile(lm, seqs, batch, progress=False)
    mem_s = time.perf_counter() - t
    del lm
    sm = open_streamed(model)
    with tempfile.TemporaryDirectory() as run:
        t = time.perf_counter()
        prof = profile_streamed(sm, seqs, run, "bench", batch, progress=False)
        st_s = time.perf_counter() - t
        prof.save(run)
        from actpat.activation.profiling import Profile

        got = Profile.load(run)
    err = max(float((got.maps[k] - ref.maps[k]).norm() / ref.maps[k].norm()) for k in ref.maps)
    s = prof.meta["streamed"]
    batches = -(-samples // batch)
    print(json.dumps({"model": model, "samples": samples, "seq_len": seq_len, "batch": batch, "dataset": dataset,
                      "tokens": sum(len(x) for x in seqs),
                      "in_memory_s_per_sample": round(mem_s / samples, 3),
                      "streamed_s_per_sample": round(st_s / samples, 3),
                      "streamed_scoring_s_per_sample": round(s["scoring_s"] / samples, 3),
                      "ratio": round(st_s / mem_s, 2),
                      "checkpoint_read_per_batch_gb": round(
                          s["checkpoint_bytes_read"] / batches / 1e9, 3),
                      "max_rel_frobenius": err}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--layers", type=int, default=32)
    m.add_argument("--hidden", type=int, default=4096)
    m.add_argument("--intermediate", type=int, default=11008)
    m.add_argument("--heads", type=int, default=32)
    m.add_argument("--kv-heads", type=int, default=32)
    r = sub.add_parser("rss")
    r.add_argument("prefix")
    r.add_argument("--data-dir", required=True, help="folder with c4/ and wikitext2/")
    r.add_argument("--layers", default="4,8,16", help="layer counts, e.g. 4,16")
    b = sub.add_parser("engines", aliases=["smollm2"])
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--data-dir", default=None, help="folder with c4/ (default: packaged text)")
    a = p.parse_args()
    if a.cmd == "make":
        make(Path(a.out), a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads)
    elif a.cmd == "rss":
        rss(Path(a.prefix), a.data_dir, tuple(int(x) for x in a.layers.split(",")))
    else:
        engines(a.model, a.data_dir)


if __name__ == "__main__":
    main()
