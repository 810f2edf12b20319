"""SmolLM2 Wanda rows for the 2025 allocators (atp, dlp) and the search allocator, on the Table-1
footing: 64 x 256 C4-train calibration windows (seed 0), perplexity on the first 100 windows of
256 tokens of WikiText-2 test and C4 validation, float32, CPU. The activation counts N_i (the
search's start) are the Table-1 run's, read from its records (``--table1``), so the search starts
from exactly the activation allocation whose row it is compared with.

Held-apart windows (atp's grid and the search's scores): the ``--held`` calibration windows that
follow the 64 pruning windows in the same seeded C4-train draw (other documents; never an
evaluation split). One JSON per configuration in ``--out`` (a finished one is skipped).

    python benchmarks/allocators_results.py --table1 docs/results/table1-smollm2.json \
        --data-dir DATA --out runs/allocators-smollm2 [--only search-0.7,atp-0.7]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--table1", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="search-0.7,atp-0.7,dlp-0.7,search-0.5,atp-0.5,dlp-0.5")
    p.add_argument("--held", type=int, default=8)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from actpat.data.calibration import calibration_sequences
    from actpat.evaluation.evaluate import evaluate
    from actpat.models.loading import load_model
    from actpat.sparsity.allocation import fix_mean, model_layer_sizes
    from actpat.sparsity.allocation_search import SearchSettings, search_allocation
    from actpat.sparsity.allocators_2025 import atp_allocation, dlp_allocation
    from actpat.sparsity.layerwise import prune_model

    table1 = {r["name"]: r for r in json.loads(Path(args.table1).read_text())}
    counts = table1["wanda-activation-0.5-c4-s0"]["allocation"]["counts"]["counts"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora: dict = {}
    for name in args.only.split(","):
        method, level = name.split("-")
        sparsity = float(level)
        path = out / f"wanda-{method}-{level}-c4-s0.json"
        if path.exists():
            print(f"{name}: done before", flush=True)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        lm = load_model("smollm2-135m", "cpu", "float32")
        samples = calibration_sequences(lm.tokenizer, "c4", 64 + args.held, 256, 0, split="train",
                                        data_dir=args.data_dir)
        calib, held = samples.sequences[:64], samples.sequences[64:]
        alone = calibration_sequences(lm.tokenizer, "c4", 64, 256, 0, split="train",
                                      data_dir=args.data_dir)
        assert alone.sequences == calib  # the Table-1 pruning windows, unchanged
        sizes = model_layer_sizes(lm.model)
        info: dict = {}
        a0, ac0 = time.perf_counter(), time.process_time()
        if method == "atp":
            s = atp_allocation(sparsity, model=lm.model, calib_inputs=calib, held_inputs=held,
                               layer_sizes=sizes, batch_size=4, info=info)
        elif method == "dlp":
            s = dlp_allocation(sparsity, model=lm.model, calib_inputs=calib, batch_size=4,
                               info=info)
        else:
            settings = SearchSettings() if args.budget is None else \
                SearchSettings(budget=args.budget)
            s = search_allocation(sparsity, model=lm.model, calib_inputs=calib, held_inputs=held,
                                  counts=counts, layer_sizes=sizes, batch_size=4, info=info,
                                  search=settings, search_state=out / f"{name}.search.json",
                                  log=lambda m: print(m, flush=True))
        s = fix_mean(s, sparsity, sizes)
        alloc_s, alloc_cpu = time.perf_counter() - a0, time.process_time() - ac0
        p0, pc0 = time.perf_counter(), time.process_time()
        report = prune_model(lm.model, calib, s, "wanda", batch_size=4, progress=False)
        prune_s, prune_cpu = time.perf_counter() - p0, time.process_time() - pc0
        e0 = time.perf_counter()
        results = evaluate(lm.model, lm.tokenizer, ["wikitext2", "c4"], 100, 256, 4,
                           args.data_dir, False, corpora)
        rec = {"name": path.stem, "method": method, "sparsity": sparsity, "sparsities": s,
               "info": info, "achieved": report["achieved_sparsity"], "eval": results,
               "held_windows": {"dataset": "c4", "split": "train", "seed": 0,
                                "documents": samples.indices[64:]},
               "cost": {"allocation_wall_s": round(alloc_s, 1),
                        "allocation_cpu_s": round(alloc_cpu, 1),
                        "prune_wall_s": round(prune_s, 1), "prune_cpu_s": round(prune_cpu, 1),
                        "eval_wall_s": round(time.perf_counter() - e0, 1),
                        "total_wall_s": round(time.perf_counter() - t0, 1),
                        "total_cpu_s": round(time.process_time() - c0, 1),
                        "peak_rss_mb": round(peak_mb()), "threads": args.threads}}
        path.write_text(json.dumps(rec, indent=1))
        print(f"{name}: wikitext2 {results['wikitext2']['ppl']:.2f} c4 {results['c4']['ppl']:.2f}"
              f" (allocation {alloc_cpu:.0f} s CPU, prune {prune_cpu:.0f} s CPU)", flush=True)
        del lm


if __name__ == "__main__":
    main()
