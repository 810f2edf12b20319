"""Depth-pruning results on one model (docs/results/depth-<model>.md): layer scores, which
layers each removes, perplexity of the depth-pruned models and of unstructured Wanda at the
sparsity that removes as many weights, and the checkpoints the speed benchmark times.

    python benchmarks/depth_results.py --out runs/depth-smollm2 [--windows 100] \
        [--steps depth,checkpoints,dense,wanda,zeroshot] [--dtype bfloat16]

Resumable: every step writes one JSON file under --out and is skipped when the file exists.
Calibration: the first --calibration-samples C4-train windows (seed 0, the Table-1 windows)
profile the model and give the block influence; the next --search-samples windows of the same
draw (other documents) are the search's held-apart windows. Perplexity: the first --windows
windows of --seq-len tokens of WikiText-2 test and C4 validation (the Table-1 windows).
Zero-shot: the first --zeroshot-limit items of --zeroshot-tasks (lm-eval through actpat) for
the dense model, each depth-pruned model and each Wanda model; one JSON per model. --dtype sets
the dtype of every score, search, perplexity and zero-shot; the speed-benchmark checkpoints are
always written from a float32 load of the model (the benchmark times float32).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--drops", default="4,8", help="numbers of layers to remove")
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--search-samples", type=int, default=16)
    p.add_argument("--search-width", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (docs/precision.md)")
    p.add_argument("--zeroshot-tasks", default="piqa")
    p.add_argument("--zeroshot-limit", type=int, default=200, help="first N items per task")
    p.add_argument("--steps", default="depth,checkpoints,dense,wanda,zeroshot",
                   help="after the scores and the search, in this order: depth (perplexity "
                        "of the depth-pruned models), checkpoints (depth-pruned, 50%% and 2:4 "
                        "models for the speed bench), dense (the dense model's perplexity), "
                        "wanda (perplexity of Wanda at the equivalent sparsity), zeroshot "
                        "(--zeroshot-tasks of dense, depth-pruned and Wanda models)")
    p.add_argument("--plot", default=None, help="only draw the scores figure (PNG) from --out")
    p.add_argument("--table", action="store_true", help="only print the perplexity table")
    p.add_argument("--collect", default=None, help="only gather every step's JSON into this file")
    args = p.parse_args()
    if args.plot:
        return plot(Path(args.out), args.plot, [int(x) for x in args.drops.split(",")])
    if args.collect:
        return collect(Path(args.out), args.collect, args.data_dir)
    if args.table:
        print(table(Path(args.out), [int(x) for x in args.drops.split(",")]))
        return print("\n" + zeroshot_table(Path(args.out)))
    steps = set(args.steps.split(","))
    torch.set_num_threads(1)

    from actpat.data.calibration import calibration_sequences
    from actpat.sparsity.depth import (activation_scores, block_influence, equivalent_sparsity,
                              lowest_layers, remove_layers, removal_order, search_layers)
    from actpat.evaluation.evaluate import load_corpus, perplexity, zero_shot
    from actpat.models.architectures import decoder_layers
    from actpat.models.loading import load_model
    from actpat.activation.profiling import PROFILE_FILE, Profile, compute_profile, counts
    from actpat.runs import write_json
    from actpat.sparsity.layerwise import prune_model
    from actpat.sparsity.saving import save_pruned

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model, dtype=args.dtype)
    n_layers = len(decoder_layers(lm.model))
    drops = [int(x) for x in args.drops.split(",")]
    n_cal = args.calibration_samples
    calib = calibration_sequences(lm.tokenizer, "c4", n_cal + args.search_samples, args.seq_len,
                                  seed=0, split="train", data_dir=args.data_dir)
    scoring, held_apart = calib.sequences[:n_cal], calib.sequences[n_cal:]

    def step(name, fn):
        path = out / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(path, result)
        print(f"{name}: {result['seconds']} s", flush=True)
        return result

    prof_dir = out / "profile"  # only the scores step reads it
    if not (out / "scores.json").exists() and not (prof_dir / PROFILE_FILE).exists():
        meta = {"model": lm.identity, "dataset": "c4", "split": "train", "seed": 0,
                "seq_len": args.seq_len, "data_source": calib.source,
                "sample_indices": calib.indices[:n_cal]}
        compute_profile(lm, scoring, args.batch_size, meta=meta, progress=False).save(prof_dir)

    def scores():
        prof = Profile.load(prof_dir)
        gamma = counts(prof, gamma_quantile=0.1).gamma
        act = activation_scores(prof, gamma=gamma, gamma_quantile=None)
        mass = activation_scores(prof, statistic="mass")
        del prof  # 4 bytes per weight: not needed by the block influence pass
        return {"activation": act, "gamma": gamma, "activation_mass": mass,
                "block-influence": block_influence(lm.model, scoring, args.batch_size),
                "calibration": {"source": calib.source, "indices": calib.indices[:n_cal]}}

    sc = step("scores", scores)
    seed_order = removal_order(sc["activation"])

    def search():
        res = search_layers(lm.model, max(drops), seed_order, held_apart, args.search_width,
                            "kl", args.batch_size)
        return dict(res.to_json(), windows={"source": calib.source,
                                            "indices": calib.indices[n_cal:]})

    se = step("search", search)
    corpora = {}

    def ppl(model):
        res = {}
        for name in ("wikitext2", "c4"):
            if name not in corpora:
                corpora[name] = load_corpus(lm.tokenizer, name, args.data_dir)
            res[name] = perplexity(model, corpora[name], args.seq_len, args.windows,
                                   args.batch_size)
        return res

    def chosen(k):
        return {"activation": lowest_layers(sc["activation"], k),
                "block-influence": lowest_layers(sc["block-influence"], k),
                "search": sorted(se["removed_in_order"][:k])}

    done: dict[tuple, str] = {}  # a layer set chosen by two scores is evaluated once
    for k in drops if "depth" in steps else []:
        for score, drop in chosen(k).items():
            def run(drop=drop, score=score):
                same = done.get(tuple(drop))
                if same is not None:
                    return dict(json.loads((out / f"{same}.json").read_text()), score=score,
                                same_layers_as=same)
                model = copy.deepcopy(lm.model)
                info = remove_layers(model, drop)
                return {"score": score, "drop": k, "removed": drop, "kept": info["kept"],
                        "equivalent_sparsity": equivalent_sparsity(lm.model, drop),
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "dtype": args.dtype, "ppl": ppl(model)}
            step(f"depth-{score}-{k}", run)
            done.setdefault(tuple(drop), f"depth-{score}-{k}")

    # for the speed benchmark; which weights are zero does not change the speed
    if "checkpoints" in steps:
        ck = out / "checkpoints"
        full = lm if args.dtype == "float32" else None
        names = [f"depth-{k}" for k in drops] + ["magnitude-50", "magnitude-2of4"]
        if full is None and not all((ck / n / "config.json").exists() for n in names):
            full = load_model(args.model)  # float32: what the speed benchmark times
        for k in drops:
            d = ck / f"depth-{k}"
            if not (d / "config.json").exists():
                model = copy.deepcopy(full.model)
                info = remove_layers(model, lowest_layers(sc["activation"], k))
                save_pruned(model, full.tokenizer, d, {"model": full.identity, "depth": info,
                                                     "layer_score": "activation"})
        for name, pattern in (("magnitude-50", "unstructured"), ("magnitude-2of4", "2:4")):
            d = ck / name
            if not (d / "config.json").exists():
                model = copy.deepcopy(full.model)
                rep = prune_model(model, None, [0.5] * n_layers, "magnitude", pattern,
                                  progress=False)
                save_pruned(model, full.tokenizer, d, {"model": full.identity, "pruner": "magnitude",
                                                     "pattern": pattern, "achieved_sparsity":
                                                         rep["achieved_sparsity"]})
        del full
        print("checkpoints written", flush=True)

    if "dense" in steps:
        step("dense", lambda: {"dtype": args.dtype, "ppl": ppl(lm.model)})
    # unstructured Wanda removing as many weights as k layers
    wanda_models: dict[float, tuple] = {}  # the Wanda model being evaluated

    def wanda_model(s):
        if s not in wanda_models:
            model = copy.deepcopy(lm.model)
            rep = prune_model(model, scoring, [s] * n_layers, "wanda", batch_size=args.batch_size,
                              progress=False)
            wanda_models[s] = (model, rep["achieved_sparsity"])
        return wanda_models[s]

    sparsities = [round(equivalent_sparsity(lm.model, lowest_layers(sc["activation"], k)), 4)
                  for k in drops]
    for s in sparsities if "wanda" in steps else []:
        def wanda(s=s):
            model, achieved = wanda_model(s)
            return {"sparsity": s, "achieved": achieved, "dtype": args.dtype, "ppl": ppl(model)}
        step(f"wanda-uniform-{s}", wanda)
        # hold at most one pruned copy (a float32 copy of a 0.5B model is 2.5 GB); the
        # zero-shot step prunes again, which costs one calibration pass
        wanda_models.pop(s, None)

    # zero-shot: one JSON per model, zeroshot-<name of its perplexity step>.json
    if "zeroshot" in steps:
        tasks = args.zeroshot_tasks.split(",")

        def shots(model, **extra):
            res = zero_shot(model, lm.tokenizer, tasks, args.zeroshot_limit, args.batch_size,
                            args.data_dir, progress=False)
            return dict(extra, dtype=args.dtype, tasks=res)

        step("zeroshot-dense", lambda: shots(lm.model))
        seen: dict[tuple, str] = {}
        for k in drops:
            for score, drop in chosen(k).items():
                def run(drop=drop, score=score, k=k):
                    same = seen.get(tuple(drop))
                    if same is not None:
                        return dict(json.loads((out / f"{same}.json").read_text()), score=score,
                                    same_layers_as=same)
                    model = copy.deepcopy(lm.model)
                    remove_layers(model, drop)
                    return shots(model, score=score, drop=k, removed=drop)
                step(f"zeroshot-depth-{score}-{k}", run)
                seen.setdefault(tuple(drop), f"zeroshot-depth-{score}-{k}")
        for s in sparsities:
            def run(s=s):
                model, achieved = wanda_model(s)
                return shots(model, sparsity=s, achieved=achieved)
            step(f"zeroshot-wanda-uniform-{s}", run)
            wanda_models.pop(s, None)


def table(out: Path, drops: list[int]) -> str:
    """Markdown rows of the perplexities found under ``out`` (missing rows are left out)."""
    dense = out / "dense.json"
    base = json.loads(dense.read_text())["ppl"] if dense.exists() else None
    n = len(json.loads((out / "scores.json").read_text())["activation"])

    def row(name, label, removed="-", params="-"):
        path = out / f"{name}.json"
        if not path.exists():
            return None
        ppl = json.loads(path.read_text())["ppl"]
        cells = []
        for corpus in ("wikitext2", "c4"):
            v = ppl[corpus]["ppl"]
            ratio = f" ({v / base[corpus]['ppl']:.2f}×)" if base and v < 1e5 else ""
            cells.append(f"{v:.2f}{ratio}" if v < 1e5 else f"{v:.3g}")
        return (f"| {label} | {removed} | {params} | {cells[0]} | {cells[1]} | "
                f"{ppl['c4']['windows']} |")

    lines = ["| model | layers removed | weights removed | wikitext2 ppl (× dense) | "
             "c4 ppl (× dense) | windows |",
             "| --- | --- | --- | ---: | ---: | ---: |", row("dense", f"dense ({n} layers)")]
    for k in drops:
        for score in ("activation", "block-influence", "search"):
            path = out / f"depth-{score}-{k}.json"
            if path.exists():
                r = json.loads(path.read_text())
                lines.append(row(f"depth-{score}-{k}", f"{score}, {k} of {n} layers",
                                 ", ".join(map(str, r["removed"])),
                                 f"{r['equivalent_sparsity']:.1%} of decoder weights"))
    for f in sorted(out.glob("wanda-uniform-*.json")):
        r = json.loads(f.read_text())
        lines.append(row(f.stem, f"Wanda uniform, unstructured {r['sparsity']:.1%}",
                         params=f"{r['achieved']:.1%} of decoder weights"))
    return "\n".join(x for x in lines if x)


def zeroshot_table(out: Path) -> str:
    """Markdown rows of the zero-shot results under ``out`` (acc ± SE, acc_norm, balanced acc,
    answer shares); empty when none ran."""
    files = sorted(out.glob("zeroshot-*.json"))
    if not files:
        return ""
    n = len(json.loads((out / "scores.json").read_text())["activation"])
    scores = ("activation", "block-influence", "search")
    depth = [f.stem for f in files if f.stem.startswith("zeroshot-depth")]
    depth.sort(key=lambda x: (int(x.rsplit("-", 1)[1]),
                              [i for i, sc in enumerate(scores) if f"-{sc}-" in x] or [9]))
    order = ["zeroshot-dense"] + depth
    order += [f.stem for f in files if f.stem.startswith("zeroshot-wanda")]
    lines = ["| model | layers removed | task | n | acc ± SE | acc_norm ± SE | balanced acc | "
             "pred share | dtype |", "| --- | --- | --- | ---: | --- | --- | ---: | --- | --- |"]
    for name in order:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        if "removed" in r:
            label, removed = f"{r['score']}, {r['drop']} of {n} layers", ", ".join(
                map(str, r["removed"]))
        elif "sparsity" in r:
            label, removed = f"Wanda uniform, unstructured {r['sparsity']:.1%}", "-"
        else:
            label, removed = f"dense ({n} layers)", "-"
        for task, t in r["tasks"].items():
            se = [(t[m] * (1 - t[m]) / t["n"]) ** 0.5 for m in ("acc", "acc_norm")]
            lines.append(f"| {label} | {removed} | {task} | {t['n']} | {t['acc']:.3f} ± "
                         f"{se[0]:.3f} | {t['acc_norm']:.3f} ± {se[1]:.3f} | "
                         f"{t['acc_balanced']:.3f} | "
                         f"{', '.join(f'{x:.2f}' for x in t['pred_share'])} | {r['dtype']} |")
    return "\n".join(lines)


def collect(out: Path, dest: str, data_dir: str | None) -> None:
    """Every step's JSON (and the bench's, when present) in one file; local data paths are
    written as $ACTPAT_DATA_DIR, other absolute paths by their last component."""
    import os
    import re

    found = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
    text = json.dumps(found, indent=1)
    root = data_dir or os.environ.get("ACTPAT_DATA_DIR")
    if root:
        text = text.replace(str(Path(root).resolve()), "$ACTPAT_DATA_DIR")
    text = re.sub(r'"/[^"]*/([^"/]+)"', r'"\1"', text)
    Path(dest).write_text(text + "\n")


def plot(out: Path, png: str, drops: list[int]) -> None:
    """Per layer: N_i and block influence (each over its maximum), the layers each score
    removes marked below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = json.loads((out / "scores.json").read_text())
    se = json.loads((out / "search.json").read_text())
    from actpat.sparsity.depth import lowest_layers

    n = len(sc["activation"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    act = [x / max(sc["activation"]) for x in sc["activation"]]
    bi = sc["block-influence"]
    top.plot(range(n), act, "o-", label="activation: N_i / max N_i (C4, gamma at 10%)")
    top.plot(range(n), [x / max(bi[1:]) for x in bi], "s-",
             label=f"block influence / max over layers 1-{n - 1} (layer 0: off the scale)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("score (lowest removed first)")
    top.legend(fontsize=8, loc="upper right")
    rows = []
    for k in drops:
        rows += [(f"activation, {k}", lowest_layers(sc["activation"], k)),
                 (f"block influence, {k}", lowest_layers(bi, k)),
                 (f"search, {k}", sorted(se["removed_in_order"][:k]))]
    for y, (name, layers) in enumerate(rows):
        bottom.scatter(layers, [y] * len(layers), marker="x", color="C3")
    bottom.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xticks(range(0, n, 2))
    bottom.set_xlabel("decoder layer (0-based)")
    bottom.set_title("layers removed", fontsize=9)
    bottom.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
