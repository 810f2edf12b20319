"""The summaries of a plan's results: Table 1 as ``results.json`` / ``table.md`` /
``sparsities.png``, validation 2's calibration specificity as ``calibration.json`` / ``.md`` /
``.png``."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..runs import write_json
from .plan import CALIBRATION_METRICS, CONFIG_DIR, PPL, ZERO_SHOT, Config


def write_summary(out: str | Path) -> None:
    """The run directory's results so far, every configuration in it: ``OUT/results.json`` (the
    records), ``OUT/table.md`` (``table_markdown``) and ``OUT/sparsities.png`` (S_i per layer
    of each allocator, seed 0: one panel per sparsity, one line per allocator)."""
    from ..outputs.plots import plot_allocation_panels

    out = Path(out)
    results = load_results(out)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table_markdown(results) + "\n")
    panels = allocation_panels(results)
    if panels:
        plot_allocation_panels(panels, out / "sparsities.png",
                               "Layer-wise sparsity S_i (calibration seed 0)")


def allocation_panels(results: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{"S = 0.5": {allocator: S_i}}`` of the seed-0 unstructured prunes, by sparsity."""
    panels: dict[float, dict[str, list[float]]] = {}
    for rec in results:
        c = rec["config"]
        alloc = (rec.get("allocation") or {}).get("sparsities")
        if c["pruner"] and c["seed"] == 0 and c["pattern"] == "unstructured" and alloc:
            panels.setdefault(c["sparsity"], {}).setdefault(c["allocation"], alloc)
    return {f"S = {s:g}": dict(sorted(curves.items())) for s, curves in sorted(panels.items())}


def load_results(out: str | Path) -> list[dict]:
    import json

    folder = Path(out) / CONFIG_DIR
    if not folder.is_dir():
        raise UserError(f"{out} holds no {CONFIG_DIR}/ folder; run `actpat reproduce` into it first")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def write_calibration_summary(out: str | Path, configs: list[Config],
                              relatedness: dict | None = None) -> dict:
    """Validation 2's verdict numbers (``findings.calibration_specificity``) for each metric of
    ``CALIBRATION_METRICS`` the records hold, written to ``OUT/calibration.json``, ``OUT/calibration.md`` and ``OUT/calibration.png``
    (balanced accuracy when recorded, else acc).

    Uses every zero-shot record in ``OUT`` pruned like the pruned ``configs`` (same pruner,
    allocation, sparsity and pattern; any calibration set and seed), and the dense ones: runs
    made with ``--seed 1`` then ``--seed 2`` are averaged together."""
    from ..analysis.findings import calibration_specificity

    kinds = {(c.pruner, c.allocation, c.sparsity, c.pattern) for c in configs if c.pruner}
    records = [r for r in load_results(out) if any(t in ZERO_SHOT for t in r["config"]["evals"])
               and (r["config"]["pruner"] is None or (
                   r["config"]["pruner"], r["config"]["allocation"], r["config"]["sparsity"],
                   r["config"]["pattern"]) in kinds)]
    spec = {"kind": "actpat-calibration"}
    spec.update({m: calibration_specificity(records, m, relatedness) for m in CALIBRATION_METRICS
                 if any(m in v for r in records for v in r["eval"].values())})
    write_json(Path(out) / "calibration.json", spec)
    (Path(out) / "calibration.md").write_text(calibration_markdown(spec) + "\n")
    shown = spec.get("acc_balanced") or spec["acc"]  # the bias-robust metric when recorded
    if shown["tasks"] and shown["calibrations"]:
        from ..outputs.plots import plot_calibration

        plot_calibration(shown, Path(out) / "calibration.png")
    return spec


def calibration_markdown(spec: dict) -> str:
    """``OUT/calibration.md``: per metric, accuracy by calibration set (rows) and task
    (columns), the own task in bold, then the own-set verdict and the relatedness correlation."""
    lines = []
    for metric in CALIBRATION_METRICS:
        m = spec.get(metric)
        if not m or not m["tasks"]:
            continue
        tasks = m["tasks"]
        lines += [f"{metric}, calibration set (rows) x task (columns); bold = the set's own task"
                  "; with several calibration seeds, mean ± half the range:",
                  "", "| calibration | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for x in m["calibrations"]:
            cells = []
            for t in tasks:
                if t not in m["acc"][x]:
                    cells.append("–")
                    continue
                text = f"{m['acc'][x][t]:.3f}"
                if len(m["seeds"][x]) > 1:
                    text += f" ± {m['spread'][x][t]:.3f}"
                cells.append(f"**{text}**" if x == t else text)
            label = x + (f" (seeds {','.join(map(str, m['seeds'][x]))})"
                         if len(m["seeds"][x]) > 1 else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, row in (("dense", m["dense"]), ("standard error", m["se"])):
            lines.append(f"| {label} | " + " | ".join(
                f"{row[t]:.3f}" if t in row else "–" for t in tasks) + " |")
        lines += ["", f"Own calibration set strictly best on {m['own_best']} of {len(m['own'])} "
                  f"tasks ({m['own_best_by_1se']} by more than one standard error), tied for "
                  f"best on {m['own_tied_best']}:", ""]
        lines += [f"- {t}: {v['acc']:.3f}, rank {v['rank']} of {v['of']}, best other "
                  f"{v['best_other']:.3f}, margin {v['margin']:+.3f}"
                  + (f" ({v['margin_se']:+.1f} SE)" if v["margin_se"] is not None else "")
                  for t, v in m["own"].items()]
        for band, r in (m.get("relatedness") or {}).items():
            fmt = lambda x: "n/a" if x is None else f"{x:+.2f}"  # noqa: E731
            lines.append(f"- relatedness ({band} layers) vs accuracy, Spearman: "
                         f"{fmt(r['spearman'])} over {r['n_pairs']} pairs, "
                         f"{fmt(r['spearman_without_own'])} without the own-set pairs")
        lines.append("")
    return "\n".join(lines).rstrip()


# --------------------------------------------------------------------------- summaries


def _row_key(rec: dict) -> tuple:
    c = rec["config"]
    if c["pruner"] is None:
        return ("dense", "-", "-")
    level = c["pattern"] if c["pattern"] != "unstructured" else f"{c['sparsity']:g}"
    return (c["pruner"], c["allocation"], level)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (pruner, allocation, level): each metric as mean, half-range and seeds.

    Perplexity rows come from configurations evaluated on wikitext2/c4, zero-shot columns from
    those evaluated on the QA tasks; calibration seeds are pooled (``seeds`` lists them).
    """
    rows: dict[tuple, dict] = {}
    for rec in results:
        key = _row_key(rec) + (rec["config"].get("calibration", "c4"),)
        row = rows.setdefault(key, {"pruner": key[0], "allocation": key[1], "level": key[2],
                                    "calibration": key[3], "metrics": {}, "seeds": set(),
                                    "achieved": []})
        if rec["config"]["pruner"] is not None:
            row["seeds"].add(rec["config"]["seed"])
            row["achieved"].append(rec["prune"]["achieved_sparsity"])
        for task, r in rec["eval"].items():
            for metric in ("ppl", "acc", "acc_norm"):
                if metric in r:
                    m = row["metrics"].setdefault(f"{task}:{metric}", {"values": [], "size": None,
                                                                        "source": r["source"]})
                    m["values"].append(r[metric])
                    m["size"] = (f"{r['windows']}x{r['seq_len']}" if metric == "ppl"
                                 else f"n={r['n']}")
    out = []
    for row in rows.values():
        for m in row["metrics"].values():
            v = m["values"]
            m["mean"] = sum(v) / len(v)
            m["half_range"] = (max(v) - min(v)) / 2
            m["runs"] = len(v)
        row["seeds"] = sorted(row["seeds"])
        out.append(row)
    return out


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    m = row["metrics"].get(key)
    if m is None:
        return "–"
    text = fmt.format(m["mean"])
    if m["runs"] > 1:
        text += f" ± {fmt.format(m['half_range'])} ({m['runs']} seeds)"
    return text


def table_markdown(results: list[dict], tasks_ppl=PPL, tasks_zs=ZERO_SHOT) -> str:
    """Markdown tables: perplexity rows, then zero-shot rows (only rows that have them)."""
    rows = summarize(results)
    order = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3}
    from ..sparsity.allocators import ALLOCATORS

    alloc = {"-": 0, **{name: i + 1 for i, name in enumerate(ALLOCATORS)}}
    rows.sort(key=lambda r: (r["level"] if r["level"] != "-" else "", order.get(r["pruner"], 9),
                             alloc.get(r["allocation"], 9), r["calibration"]))
    lines = []
    ppl_rows = [r for r in rows if any(f"{t}:ppl" in r["metrics"] for t in tasks_ppl)]
    if ppl_rows:
        lines += ["| sparsity | pruner | allocation | achieved | "
                  + " | ".join(f"{t} ppl" for t in tasks_ppl) + " |",
                  "|---|---|---|---|" + "---|" * len(tasks_ppl)]
        for r in ppl_rows:
            ach = f"{sum(r['achieved']) / len(r['achieved']):.4f}" if r["achieved"] else "0"
            lines.append(f"| {r['level']} | {r['pruner']} | {r['allocation']} | {ach} | "
                         + " | ".join(_cell(r, f"{t}:ppl") for t in tasks_ppl) + " |")
    zs_rows = [r for r in rows if any(f"{t}:acc" in r["metrics"] for t in tasks_zs)]
    if zs_rows:
        lines += ["", "| sparsity | pruner | allocation | calibration | "
                  + " | ".join(f"{t} acc / acc_norm" for t in tasks_zs) + " | mean acc |",
                  "|---|---|---|---|" + "---|" * (len(tasks_zs) + 1)]
        for r in zs_rows:
            cells = []
            accs = []
            for t in tasks_zs:
                a, n = r["metrics"].get(f"{t}:acc"), r["metrics"].get(f"{t}:acc_norm")
                cells.append("–" if a is None else f"{a['mean']:.3f} / {n['mean']:.3f}")
                if a is not None:
                    accs.append(a["mean"])
            mean = f"{sum(accs) / len(accs):.3f}" if accs else "–"
            lines.append(f"| {r['level']} | {r['pruner']} | {r['allocation']} | "
                         f"{r['calibration'] if r['pruner'] != 'dense' else '-'} | "
                         + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)

