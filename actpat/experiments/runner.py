"""The paper's pruning experiments end to end: Table 1 (validation 1) and calibration specificity
(validation 2), each a list of configurations run one after another.

A *configuration* is (pruner, allocation, sparsity, pattern, calibration set, seed) plus the
evaluations to run on the pruned model. Each finished configuration is written at once to
``<out>/configs/<name>.json`` (atomic write); a configuration whose JSON exists is skipped, so a
killed run resumes where it stopped. Every configuration starts from a fresh copy of the model.

Activation allocation: the counts N_i come from a profile of C4 (the paper's calibration corpus),
either ``Settings.profile_dir`` or computed once on the seed-0 C4 calibration windows (whatever
the seed of the row that first needs them) and saved in ``<out>/counts-profile``; gamma is a
quantile (``Settings.gamma_quantile``) and is recorded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..evaluation.evaluate import PERPLEXITY_SPLITS, evaluate
from ..runs import write_json

CONFIG_DIR = "configs"
COUNTS_PROFILE = "counts-profile"
PPL = tuple(PERPLEXITY_SPLITS)  # ("wikitext2", "c4")
ZERO_SHOT = ("boolq", "piqa", "siqa", "hellaswag", "mmlu")
# Calibration split per dataset: C4 train (perplexity uses validation). QA sets use their only
# local split, rows after the first 200 (actpat.calibration), so evaluated items never calibrate.
CALIBRATION_SPLITS = {"c4": "train"}
CALIBRATION_METRICS = ("acc", "acc_norm", "acc_balanced")  # validation 2's summary, when recorded
COUNTS_CALIBRATION = "c4"  # the activation allocation's counts: a profile of C4 (the paper)


@dataclass
class Settings:
    """What every configuration of a reproduction shares (all recorded in each result)."""

    model: str = "smollm2-135m"
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seq_len: int = 256  # perplexity window length
    windows: int = 100  # perplexity: first N windows of each corpus
    zero_shot_limit: int = 200  # zero-shot: first N items of each task
    calib_samples: int = 64
    calib_seq_len: int = 256
    gamma_quantile: float = 0.1  # activated = top 10% of all scored weights (activation counts)
    profile_dir: str | None = None  # counts profile to reuse (else computed on calibration data)
    profile_samples: int = 64
    batch_size: int = 4
    progress: bool = False


@dataclass(frozen=True)
class Config:
    pruner: str | None  # None = dense
    allocation: str = "uniform"
    sparsity: float = 0.0
    pattern: str = "unstructured"
    calibration: str = "c4"
    seed: int = 0
    evals: tuple[str, ...] = PPL

    @property
    def name(self) -> str:
        if self.pruner is None:
            base = "dense"
        else:
            level = self.pattern.replace(":", "of") if self.pattern != "unstructured" \
                else f"{self.sparsity:g}"
            base = f"{self.pruner}-{self.allocation}-{level}-{self.calibration}-s{self.seed}"
        return base + ("-zs" if any(t in ZERO_SHOT for t in self.evals) else "")


# --------------------------------------------------------------------------- plans


def table1_configs(sparsities=(0.5, 0.6, 0.7), seeds=(0, 1, 2), zero_shot: bool = True,
                   tasks: tuple[str, ...] = ZERO_SHOT,
                   seeded: tuple[str, ...] = ("uniform", "activation"),
                   allocations=("uniform", "activation", "owl", "alphapruning"),
                   sparsegpt: bool = True, nm: bool = True) -> list[Config]:
    """Table 1 in priority order: the cheapest most informative configurations first.

    ``seeds`` beyond the first apply to the Wanda rows of the ``seeded`` allocations at the first
    sparsities (50% and 60% when asked, else the first one given)."""
    out = [Config(None)]
    first = [s for s in sparsities if s in (0.5, 0.6)] or list(sparsities)[:1]
    rest = [s for s in sparsities if s not in first]
    for s in first:  # 1. magnitude, Wanda uniform vs activation, seed 0
        out += [Config("magnitude", "uniform", s), Config("wanda", "uniform", s),
                Config("wanda", "activation", s)]
    for seed in seeds[1:]:  # 2. seeds of the rows the verdict rests on
        for s in first:
            out += [Config("wanda", a, s, seed=seed) for a in seeded]
    for s in list(first) + rest:  # 3. the other allocators and SparseGPT, higher sparsity
        if s in rest:
            out += [Config("magnitude", "uniform", s), Config("wanda", "uniform", s),
                    Config("wanda", "activation", s)]
        out += [Config("wanda", a, s) for a in allocations if a not in ("uniform", "activation")]
        if sparsegpt:
            out += [Config("sparsegpt", "uniform", s), Config("sparsegpt", "activation", s)]
    if nm:
        out += [Config("wanda", "uniform", 0.5, "2:4"), Config("sparsegpt", "uniform", 0.5, "2:4")]
    if zero_shot:  # 4. zero-shot at 50%
        # perplexity of the same pruned models is in the rows above (same seed, deterministic)
        out += [Config(None, evals=tasks)] + [
            Config("wanda", a, 0.5, evals=tasks) for a in ("uniform", "activation", "owl")]
    seen, plan = set(), []
    for c in out:
        if c.name not in seen:
            seen.add(c.name)
            plan.append(c)
    return plan


def calibration_configs(datasets=("boolq", "mmlu", "siqa", "hellaswag", "c4"),
                        sparsity: float = 0.5, seed: int = 0,
                        tasks: tuple[str, ...] = ZERO_SHOT) -> list[Config]:
    """Validation 2: Wanda (uniform) calibrated on each dataset in turn, all five tasks each
    (or ``tasks``)."""
    return [Config(None, evals=tasks)] + [
        Config("wanda", "uniform", sparsity, calibration=d, seed=seed, evals=tasks)
        for d in datasets]


# --------------------------------------------------------------------------- running


@dataclass
class PlanState:
    settings: Settings
    out: Path
    corpora: dict = field(default_factory=dict)  # tokenized perplexity corpora, reused
    counts: tuple | None = None  # (Counts, info) for the activation allocation


def _load(settings: Settings):
    from ..models.loading import load_model

    return load_model(settings.model, settings.device, settings.dtype)


def _calibration(lm, settings: Settings, cfg: Config):
    from ..data.calibration import DEFAULT_EXCLUDE_FIRST, calibration_sequences

    split = CALIBRATION_SPLITS.get(cfg.calibration)  # never the evaluated split of a corpus
    # QA sets: the evaluated items (the first zero_shot_limit) never calibrate
    held_out = max(DEFAULT_EXCLUDE_FIRST, settings.zero_shot_limit)
    return calibration_sequences(lm.tokenizer, cfg.calibration, settings.calib_samples,
                                 settings.calib_seq_len, cfg.seed, split=split,
                                 data_dir=settings.data_dir, exclude_first=held_out)


def _activation_counts(ctx: PlanState, lm):
    """Counts from ``settings.profile_dir``, else from a profile saved under the run dir, made
    from the seed-0 C4 calibration windows whatever the configuration's own seed or calibration
    set (so every activation row of a run shares the same N_i, in whatever order rows run)."""
    if ctx.counts is not None:
        return ctx.counts
    from ..sparsity.allocation import activation_counts
    from ..activation.profiling import PROFILE_FILE, compute_profile

    s = ctx.settings
    if s.profile_dir:
        ctx.counts = activation_counts(profile_dir=s.profile_dir, lm=lm,
                                       gamma_quantile=s.gamma_quantile)
        return ctx.counts
    run = ctx.out / COUNTS_PROFILE
    if not (run / PROFILE_FILE).exists():
        calib = _calibration(lm, s, Config("wanda", calibration=COUNTS_CALIBRATION, seed=0))
        seqs = calib.sequences[: s.profile_samples]
        meta = {"model": lm.identity, "dataset": COUNTS_CALIBRATION,
                "split": CALIBRATION_SPLITS[COUNTS_CALIBRATION], "data_source": calib.source,
                "seq_len": s.calib_seq_len, "seed": 0, "sample_indices": calib.indices,
                "purpose": "activation counts for the activation allocation"}
        compute_profile(lm, seqs, s.batch_size, meta=meta, progress=s.progress).save(run)
    ctx.counts = activation_counts(profile_dir=str(run), lm=lm, gamma_quantile=s.gamma_quantile)
    return ctx.counts


def layer_sparsities(ctx: PlanState, lm, cfg: Config, calib) -> tuple[list[float], dict]:
    """S_i for ``cfg`` and what they were computed from."""
    from ..models.loading import decoder_layers
    from ..sparsity.allocation import ALLOCATORS, allocate

    if cfg.pattern != "unstructured":
        n = len(decoder_layers(lm.model))
        return [cfg.sparsity] * n, {"method": "uniform (N:M fixes every layer)"}
    info: dict = {"method": cfg.allocation}
    kwargs: dict = {"model": lm.model}
    needs = ALLOCATORS.get(cfg.allocation).needs
    if "counts" in needs:
        counts, source = _activation_counts(ctx, lm)
        kwargs["counts"] = counts.layer_counts
        info["counts"] = source
    if "calibration" in needs:
        kwargs["calib_inputs"] = calib.sequences
        kwargs["batch_size"] = ctx.settings.batch_size
    return allocate(cfg.allocation, cfg.sparsity, **kwargs), info


def run_config(ctx: PlanState, cfg: Config) -> dict:
    """Prune a fresh model as ``cfg`` says, evaluate it, return the result record."""
    from ..runs import versions
    from ..sparsity.layerwise import prune_model

    s = ctx.settings
    start = time.perf_counter()
    lm = _load(s)
    record: dict = {"name": cfg.name, "config": asdict(cfg), "settings": asdict(s)}
    if cfg.pruner is not None:
        need_calib = cfg.pruner != "magnitude" or cfg.allocation in ("activation", "owl")
        calib = _calibration(lm, s, cfg) if need_calib else None
        if calib is not None:
            record["calibration"] = {"dataset": cfg.calibration, "source": calib.source,
                                     "samples": len(calib.sequences),
                                     "seq_len": s.calib_seq_len, "seed": cfg.seed}
        sparsities, info = layer_sparsities(ctx, lm, cfg, calib)
        report = prune_model(lm.model, None if calib is None else calib.sequences, sparsities,
                             cfg.pruner, cfg.pattern, batch_size=s.batch_size,
                             progress=s.progress)
        record["allocation"] = dict(info, sparsities=sparsities)
        record["prune"] = {"achieved_sparsity": report["achieved_sparsity"],
                           "target_sparsity": report["target_sparsity"],
                           "layers_achieved": [x["achieved"] for x in report["layers"]],
                           "seconds": report["seconds"]}
    ppl_tasks = [t for t in cfg.evals if t in PPL]
    zs_tasks = [t for t in cfg.evals if t in ZERO_SHOT]
    results = {}
    if ppl_tasks:
        results.update(evaluate(lm.model, lm.tokenizer, ppl_tasks, s.windows, s.seq_len,
                                s.batch_size, s.data_dir, s.progress, ctx.corpora))
    if zs_tasks:
        results.update(evaluate(lm.model, lm.tokenizer, zs_tasks, s.zero_shot_limit, s.seq_len,
                                s.batch_size, s.data_dir, s.progress))
    record["eval"] = results
    record["wall_s"] = round(time.perf_counter() - start, 2)
    record["versions"] = versions()
    return record


def result_path(out: str | Path, cfg: Config) -> Path:
    return Path(out) / CONFIG_DIR / f"{cfg.name}.json"


def run_plan(settings: Settings, out: str | Path, configs: list[Config],
             log=print) -> list[dict]:
    """Run ``configs`` in order, skipping those whose result JSON exists; return all results."""
    import json

    out = Path(out)
    finished = {}
    for c in configs:  # checked before anything is written
        if result_path(out, c).exists():
            finished[c.name] = json.loads(result_path(out, c).read_text())
            _check_same_settings(finished[c.name].get("settings", {}), asdict(settings),
                                 result_path(out, c))
            saved = finished[c.name].get("config", {}).get("evals")
            if saved is not None and list(saved) != list(c.evals):
                raise UserError(f"{result_path(out, c)} evaluated {','.join(saved)}, this run "
                                f"asks {','.join(c.evals)}; use a new --out")
    (out / CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out / "settings.json", asdict(settings))
    ctx = PlanState(settings, out)
    results = []
    ran = False
    for i, cfg in enumerate(configs, 1):
        path = result_path(out, cfg)
        if cfg.name in finished:
            rec = finished[cfg.name]
            results.append(rec)
            log(f"[{i}/{len(configs)}] {cfg.name}: done before, skipped")
            continue
        rec = run_config(ctx, cfg)
        ran = True
        write_json(path, rec)
        results.append(rec)
        summary = ", ".join(
            f"{t} {v['ppl']:.2f}" if "ppl" in v else f"{t} {v['acc']:.3f}"
            for t, v in rec["eval"].items())
        log(f"[{i}/{len(configs)}] {cfg.name}: {summary} ({rec['wall_s']:.0f}s)")
        write_summary(out)  # after each finished configuration: the table so far
    if results and not ran:
        write_summary(out)  # nothing new was run: the summary of what is there
    return results


def write_summary(out: str | Path) -> None:
    """The run directory's results so far, every configuration in it: ``OUT/results.json`` (the
    records), ``OUT/table.md`` (``table_markdown``) and ``OUT/sparsities.png`` (S_i per layer
    of each allocator, seed 0, one line per allocator and sparsity)."""
    from ..outputs.plots import plot_allocation

    out = Path(out)
    results = load_results(out)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table_markdown(results) + "\n")
    curves = {}
    for rec in results:
        c = rec["config"]
        alloc = (rec.get("allocation") or {}).get("sparsities")
        if c["pruner"] and c["seed"] == 0 and c["pattern"] == "unstructured" and alloc:
            curves.setdefault(f"{c['allocation']} {c['sparsity']:g}", alloc)
    if curves:
        plot_allocation(dict(sorted(curves.items(), key=lambda kv: kv[0].split()[::-1])),
                        out / "sparsities.png", "Layer-wise sparsity S_i (calibration seed 0)")


def _check_same_settings(saved: dict, now: dict, path: Path) -> None:
    """A resumed run must not mix results made with other sizes or data into one table."""
    ignore = {"progress", "device"}
    diff = [k for k in now if k not in ignore and k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{path} was made with {k}={saved[k]!r}, this run asks {k}={now[k]!r}; "
                        "use a new --out or the same settings")


def load_results(out: str | Path) -> list[dict]:
    import json

    folder = Path(out) / CONFIG_DIR
    if not folder.is_dir():
        raise UserError(f"{out} holds no {CONFIG_DIR}/ folder; run `actpat reproduce` into it first")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def reproduce_table1(settings: Settings, out: str | Path, configs: list[Config] | None = None,
                     log=print) -> list[dict]:
    """Table 1 (validation 1): see ``table1_configs`` for the default plan."""
    return run_plan(settings, out, configs if configs is not None else table1_configs(), log)


def reproduce_calibration(settings: Settings, out: str | Path,
                          configs: list[Config] | None = None, log=print) -> list[dict]:
    """Validation 2: see ``calibration_configs``."""
    return run_plan(settings, out, configs if configs is not None else calibration_configs(), log)


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
    alloc = {"-": 0, "uniform": 1, "activation": 2, "owl": 3, "alphapruning": 4}
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
