"""Running a plan: every configuration prunes a fresh copy of the model, is evaluated, and is
written at once to ``<out>/configs/<name>.json``; a configuration whose JSON exists is skipped,
so a killed run resumes where it stopped (``plan`` holds the configurations, ``tables`` the
summaries).

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
from ..evaluation.evaluate import evaluate
from ..runs import write_json
from .plan import (CALIBRATION_SPLITS, CONFIG_DIR, COUNTS_CALIBRATION, COUNTS_PROFILE, PPL,
                   ZERO_SHOT, Config, Settings, calibration_configs, result_path, table1_configs)
from .tables import write_summary


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


def _calibration(lm, settings: Settings, cfg: Config, held: int = 0):
    from ..data.calibration import DEFAULT_EXCLUDE_FIRST, calibration_sequences

    split = CALIBRATION_SPLITS.get(cfg.calibration)  # never the evaluated split of a corpus
    # QA sets: the evaluated items (the first zero_shot_limit) never calibrate
    held_out = max(DEFAULT_EXCLUDE_FIRST, settings.zero_shot_limit)
    return calibration_sequences(lm.tokenizer, cfg.calibration, settings.calib_samples + held,
                                 settings.calib_seq_len, cfg.seed, split=split,
                                 data_dir=settings.data_dir, exclude_first=held_out)


def _activation_counts(ctx: PlanState, lm):
    """Counts from ``settings.profile_dir``, else from a profile saved under the run dir, made
    from the seed-0 C4 calibration windows whatever the configuration's own seed or calibration
    set (so every activation row of a run shares the same N_i, in whatever order rows run)."""
    if ctx.counts is not None:
        return ctx.counts
    from ..sparsity.allocators import activation_counts
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
                "window_start": calib.window_start,
                "purpose": "activation counts for the activation allocation"}
        compute_profile(lm, seqs, s.batch_size, meta=meta, progress=s.progress).save(run)
    ctx.counts = activation_counts(profile_dir=str(run), lm=lm, gamma_quantile=s.gamma_quantile)
    return ctx.counts


def layer_sparsities(ctx: PlanState, lm, cfg: Config, calib,
                     held=None) -> tuple[list[float], dict]:
    """S_i for ``cfg`` and what they were computed from (``held``: held-apart calibration
    windows, for allocators that need them; a resumable search keeps its state in
    ``<out>/allocation-state/<name>.json``)."""
    from ..models.architectures import decoder_layers
    from ..sparsity.allocators import ALLOCATORS, allocate

    if cfg.pattern != "unstructured":
        n = len(decoder_layers(lm.model))
        return [cfg.sparsity] * n, {"method": "uniform (N:M fixes every layer)"}
    info: dict = {"method": cfg.allocation}
    kwargs: dict = {"model": lm.model}
    needs = ALLOCATORS.get(cfg.allocation).needs
    if "counts" in needs:
        counts, source = _activation_counts(ctx, lm)
        kwargs["counts"] = counts  # a Counts: per-layer and per-matrix counts and sizes
        info["counts"] = source
    if "calibration" in needs:
        kwargs["calib_inputs"] = calib.sequences
        kwargs["batch_size"] = ctx.settings.batch_size
    if "held" in needs:
        state = ctx.out / "allocation-state"
        state.mkdir(parents=True, exist_ok=True)
        kwargs.update(held_inputs=held.sequences, search_state=state / f"{cfg.name}.json")
        info["held_windows"] = {"dataset": held.dataset, "split": held.split,
                                "samples": len(held.sequences), "indices": held.indices}
    return allocate(cfg.allocation, cfg.sparsity, info=info, **kwargs), info


def run_config(ctx: PlanState, cfg: Config) -> dict:
    """Prune a fresh model as ``cfg`` says, evaluate it, return the result record."""
    from ..runs import versions
    from ..sparsity.allocators import ALLOCATORS
    from ..sparsity.allocation_search import DEFAULT_HELD, split_held
    from ..sparsity.layerwise import prune_model
    from ..sparsity.pruners import get_pruner

    s = ctx.settings
    start = time.perf_counter()
    lm = _load(s)
    record: dict = {"name": cfg.name, "config": asdict(cfg), "settings": asdict(s)}
    if cfg.pruner is not None:
        need_calib = get_pruner(cfg.pruner).stat is not None or \
            bool(ALLOCATORS.get(cfg.allocation).needs & {"counts", "calibration"})
        held_n = DEFAULT_HELD if "held" in ALLOCATORS.get(cfg.allocation).needs else 0
        calib = _calibration(lm, s, cfg, held_n) if need_calib else None
        calib, held = split_held(calib, held_n)
        if calib is not None:
            record["calibration"] = {"dataset": cfg.calibration, "source": calib.source,
                                     "samples": len(calib.sequences),
                                     "seq_len": s.calib_seq_len, "seed": cfg.seed,
                                     "window_start": calib.window_start}
        sparsities, info = layer_sparsities(ctx, lm, cfg, calib, held)
        report = prune_model(lm.model, None if calib is None else calib.sequences, sparsities,
                             cfg.pruner, cfg.pattern, batch_size=s.batch_size,
                             progress=s.progress)
        record["allocation"] = dict(info, sparsities=sparsities)
        if hasattr(sparsities, "per_matrix"):
            record["allocation"]["matrix_sparsities"] = sparsities.per_matrix
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



def _check_same_settings(saved: dict, now: dict, path: Path) -> None:
    """A resumed run must not mix results made with other sizes or data into one table."""
    ignore = {"progress", "device"}
    diff = [k for k in now if k not in ignore and k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{path} was made with {k}={saved[k]!r}, this run asks {k}={now[k]!r}; "
                        "use a new --out or the same settings")


def reproduce_table1(settings: Settings, out: str | Path, configs: list[Config] | None = None,
                     log=print) -> list[dict]:
    """Table 1 (validation 1): see ``table1_configs`` for the default plan."""
    return run_plan(settings, out, configs if configs is not None else table1_configs(), log)


def reproduce_calibration(settings: Settings, out: str | Path,
                          configs: list[Config] | None = None, log=print) -> list[dict]:
    """Validation 2: see ``calibration_configs``."""
    return run_plan(settings, out, configs if configs is not None else calibration_configs(), log)
