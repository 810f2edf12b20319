"""The demo: the paper's pipeline end to end on one model (default SmolLM2-135M), offline.

Steps, each writing under ``<out>/`` and skipped when its outputs already exist (so a killed
demo resumes where it stopped):

1. ``profiles/<dataset>``: mean activation maps of several datasets (one model load for all);
2. ``figure1.png`` + ``counts.json``: activated weights per layer (paper Figure 1);
3. ``relate/``: dataset x dataset relatedness of the profiles (paper Figure 6);
4. ``similarity/``: within- and cross-domain pattern similarity per layer;
5. ``sts/``: Spearman rho of pattern similarity vs human scores on a small STS-B sample;
6. ``allocation/``: activation vs uniform layer sparsities at S = 0.5 (counts from the C4
   profile, gamma = 0.1 quantile);
7. ``pruned/<allocation>``: Wanda at 50% with each allocation, C4 calibration;
8. ``eval/<model>.json``: WikiText-2 perplexity and two zero-shot tasks (BoolQ, PIQA) with a
   limit, for the dense and both pruned models;
9. ``report.html``: everything above on one page.

Data: the local data dir (``--data-dir`` / ``ACTPAT_DATA_DIR``) when set, else the Hugging Face
hub when reachable, else the built-in probe texts (``actpat/probes``). With the probe texts the
pipeline still runs end to end as a *smoke run*: pruning calibrates on the packaged probe texts,
perplexity is measured on the packaged held-out prose (``probes/heldout.txt``, never used for
calibration), and ``eval/smoke.json`` is reported as a smoke run on packaged texts, not a
benchmark. Only STS (no packaged sentence pairs) and zero-shot (no packaged tasks) are skipped.

Every step calls library functions (one loaded model for the scoring steps) and writes the same
artifacts the matching command writes (``outputs.artifacts``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..hub import prepare_hub

STATE_FILE = "demo.json"
OWNED = (STATE_FILE, "profiles", "figure1.png", "counts.json", "relate", "similarity", "sts",
         "allocation", "pruned", "eval", "report.html")


@dataclass
class DemoSizes:
    """How much work each step does (``full``: ~15 min on 2 cores; ``quick``: a few minutes)."""

    profile_datasets: tuple[str, ...]
    profile_samples: int
    seq_len: int
    similarity_datasets: tuple[str, ...]
    pairs: int
    sts_pairs: int
    sts_max_tokens: int
    bootstrap: int
    sparsity: float
    calibration_samples: int
    calibration_seq_len: int
    ppl_seq_len: int
    zero_shot_tasks: tuple[str, ...]
    eval_limit: int  # perplexity: first N windows; zero-shot: first N items


FULL = DemoSizes(
    profile_datasets=("c4", "wikitext2", "boolq", "piqa", "siqa", "hellaswag", "mmlu", "gsm8k",
                      "humaneval"),
    profile_samples=16, seq_len=128,
    similarity_datasets=("boolq", "gsm8k", "humaneval"), pairs=8,
    sts_pairs=64, sts_max_tokens=64, bootstrap=200,
    sparsity=0.5, calibration_samples=32, calibration_seq_len=128,
    ppl_seq_len=256, zero_shot_tasks=("boolq", "piqa"), eval_limit=50,
)
QUICK = DemoSizes(
    profile_datasets=("c4", "boolq", "gsm8k"), profile_samples=4, seq_len=64,
    similarity_datasets=("boolq", "gsm8k"), pairs=2,
    sts_pairs=12, sts_max_tokens=32, bootstrap=100,
    sparsity=0.5, calibration_samples=8, calibration_seq_len=64,
    ppl_seq_len=128, zero_shot_tasks=("boolq", "piqa"), eval_limit=8,
)
PROBES = ("probe-prose", "probe-code", "probe-questions", "probe-arithmetic")
ALLOCATIONS = ("uniform", "activation")
HELDOUT = "heldout"  # packaged prose never used for calibration: the smoke run's perplexity
SMOKE_FILE = "smoke.json"
SMOKE_LABEL = ("smoke run on packaged texts, not a benchmark: Wanda calibrated on the probe "
               "texts, perplexity on the held-out packaged prose")


@dataclass
class DemoContext:
    out: Path
    model: str
    sizes: DemoSizes
    mode: str  # "local" | "hub" | "probes"
    data_dir: str | None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    steps: dict = field(default_factory=dict)  # name -> {"status", "seconds", "note"}
    lm: object = None

    def load(self):
        if self.lm is None:
            from ..models.loading import load_model

            self.lm = load_model(self.model, self.device)
        return self.lm

    def fresh_model(self):
        """A new copy of the dense model (pruning works in place)."""
        from ..models.loading import load_model

        return load_model(self.model, self.device)


# --------------------------------------------------------------------------- data source


def choose_data(data_dir: str | None) -> tuple[str, str | None, str]:
    """(mode, data_dir, sentence saying which) for the local dir, the hub, or the probes."""
    if data_dir:
        if not Path(data_dir).is_dir():
            raise UserError(f"data dir {data_dir} does not exist; fix --data-dir / "
                            "ACTPAT_DATA_DIR or unset it")
        return "local", str(data_dir), f"data: local benchmark subsets in {data_dir}"
    if prepare_hub():  # one probe; when it fails the hub libraries go offline for this run
        return "hub", None, "data: the Hugging Face hub (no --data-dir / ACTPAT_DATA_DIR given)"
    return "probes", None, ("data: built-in probe texts (no local data dir and the hub is "
                            "unreachable); pruning and perplexity run as a smoke run on packaged "
                            "texts; STS and zero-shot need benchmark data and are skipped")


# --------------------------------------------------------------------------- helpers


def _say(ctx: DemoContext, text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _save_state(ctx: DemoContext) -> None:
    from ..runs import versions, write_json

    write_json(ctx.out / STATE_FILE, {
        "kind": "actpat-demo", "model": ctx.model, "data_mode": ctx.mode,
        "data_dir": ctx.data_dir, "seed": ctx.seed, "sizes": asdict(ctx.sizes),
        "steps": ctx.steps, "versions": versions(),
    })


def profile_dirs(ctx: DemoContext) -> list[Path]:
    d = ctx.out / "profiles"
    return [d / n for n in _profile_datasets(ctx) if (d / n / "profile.safetensors").exists()]


def _profile_datasets(ctx: DemoContext) -> tuple[str, ...]:
    if ctx.mode == "probes":
        return PROBES
    return ctx.sizes.profile_datasets


# --------------------------------------------------------------------------- steps
# Each step: (name, outputs that mark it done, function, reason to skip or None).


def step_profiles(ctx: DemoContext) -> str | None:
    from ..data.datasets import sample_sequences
    from ..activation.profiling import compute_profile

    notes = []
    for name in _profile_datasets(ctx):
        run_dir = ctx.out / "profiles" / name
        if (run_dir / "profile.safetensors").exists():
            continue
        lm = ctx.load()
        seq_len = ctx.sizes.seq_len
        try:
            samples = sample_sequences(lm.tokenizer, name, ctx.sizes.profile_samples, seq_len,
                                       ctx.seed, None, ctx.data_dir)
        except UserError as e:
            notes.append(f"{name} skipped ({e})")
            _say(ctx, f"profile {name}: skipped ({e})")
            continue
        meta = {"model": lm.identity, "dataset": name, "split": samples.split,
                "data_source": samples.source, "seq_len": seq_len, "seed": ctx.seed,
                "sample_indices": samples.indices, "dtype": "float32",
                "device": str(next(lm.model.parameters()).device)}
        prof = compute_profile(lm, samples.sequences, 4, "max-logit", meta,
                               progress=not ctx.quiet)
        prof.save(run_dir)
        _say(ctx, f"profile {name}: {prof.meta['samples']} samples [{samples.source}] in "
                  f"{prof.meta['wall_time_s']:.1f}s")
    if not profile_dirs(ctx):
        raise UserError("no dataset could be profiled; " + "; ".join(notes))
    return "; ".join(notes) or None


def step_figure1(ctx: DemoContext) -> str | None:
    from ..outputs.plots import plot_layer_counts
    from ..activation.profiling import Profile, counts_one_gamma
    from ..runs import write_json

    rows = []
    dirs = profile_dirs(ctx)
    reference = _counts_profile(ctx)  # one gamma for all: the 0.1 quantile of the C4 profile
    profiles = [Profile.load(d) for d in dirs]
    for d, prof, c in zip(dirs, profiles, counts_one_gamma(
            profiles, [d.name for d in dirs], gamma_quantile=0.1, reference=reference.name)):
        rows.append({"run": str(d), "dataset": prof.meta.get("dataset"),
                     "data_source": prof.meta.get("data_source"), "seed": prof.meta.get("seed"),
                     **c.to_json()})
    write_json(ctx.out / "counts.json", rows)
    plot_layer_counts(rows, ctx.out / "figure1.png")
    first = []
    for r in rows:
        share = [c / s for c, s in zip(r["layer_counts"], r["scored_per_layer"])]
        first.append(f"{r['dataset']} {share[0]:.3f}/{share[len(share) // 3]:.3f}/"
                     f"{share[-1]:.3f}")
    _say(ctx, "activated share (layer 0 / L/3 / last): " + ", ".join(first))
    return None


def step_relate(ctx: DemoContext) -> str | None:
    from ..analysis.similarity import relate_runs
    from ..outputs.artifacts import write_relate

    runs = [str(d) for d in profile_dirs(ctx)]
    if len(runs) < 2:
        return "fewer than two profiles; nothing to relate"
    out = ctx.out / "relate"
    out.mkdir(parents=True, exist_ok=True)
    result, _ = relate_runs(runs)
    write_relate(result, out / "relate.json", out / "relate.png", "deep")
    return None


def step_similarity(ctx: DemoContext) -> str | None:
    from ..analysis.similarity import similarity_run
    from ..outputs.artifacts import write_similarity

    datasets = ("probe-prose", "probe-code", "probe-arithmetic") if ctx.mode == "probes" \
        else ctx.sizes.similarity_datasets
    result = similarity_run(ctx.load(), list(datasets), ctx.sizes.pairs, ctx.sizes.seq_len,
                            ctx.seed, None, ctx.data_dir, progress=not ctx.quiet)
    result["world_size"] = 1
    write_similarity(result, ctx.out / "similarity")
    return None


def step_sts(ctx: DemoContext) -> str | None:
    from ..analysis.sts import load_pairs, sts_run
    from ..outputs.artifacts import write_sts

    pairs = load_pairs("stsb", ctx.sizes.sts_pairs, ctx.seed, None, ctx.data_dir)
    result = sts_run(ctx.load(), pairs, ctx.sizes.sts_max_tokens, bootstrap=ctx.sizes.bootstrap,
                     seed=ctx.seed, progress=not ctx.quiet)
    result["world_size"] = 1
    write_sts(result, ctx.out / "sts")
    return None


def _counts_profile(ctx: DemoContext) -> Path:
    """The profile whose counts drive the activation allocation: C4 (the paper), else the first."""
    dirs = profile_dirs(ctx)
    if not dirs:
        raise UserError("no profile to count; the profiles step failed")
    for d in dirs:
        if d.name == "c4":
            return d
    return dirs[0]


def step_allocation(ctx: DemoContext) -> str | None:
    from ..outputs.plots import plot_allocation
    from ..runs import write_json
    from ..sparsity.allocators import allocation_with_record

    out = ctx.out / "allocation"
    out.mkdir(parents=True, exist_ok=True)
    prof = _counts_profile(ctx)
    for method in ALLOCATIONS:
        s, info = allocation_with_record(method, ctx.sizes.sparsity, profile_dir=str(prof))
        info["seed"] = ctx.seed
        write_json(out / f"{method}.json", info)
        plot_allocation({method: s}, out / f"{method}.png", title=f"S = {ctx.sizes.sparsity}")
    return None if prof.name == "c4" else f"counts from the {prof.name} profile (no C4 profile)"


def _calibration(ctx: DemoContext, tokenizer):
    """C4 windows with benchmark data; the packaged probe texts in a smoke run."""
    from ..data.calibration import calibration_sequences, packaged_calibration

    n, seq_len = ctx.sizes.calibration_samples, ctx.sizes.calibration_seq_len
    if ctx.mode == "probes":
        return packaged_calibration(tokenizer, n, seq_len)
    return calibration_sequences(tokenizer, "c4", n, seq_len, ctx.seed, "train", ctx.data_dir)


def step_prune(ctx: DemoContext) -> str | None:
    from ..sparsity.allocators import allocation_with_record
    from ..sparsity.layerwise import prune_model
    from ..sparsity.saving import PRUNE_RECORD, prune_record, save_pruned

    prof = _counts_profile(ctx)
    note = None
    for method in ALLOCATIONS:
        save = ctx.out / "pruned" / method
        if (save / PRUNE_RECORD).exists():
            continue
        lm = ctx.fresh_model()
        calib = _calibration(ctx, lm.tokenizer)
        if len(calib.sequences) < ctx.sizes.calibration_samples:
            note = (f"calibration: {len(calib.sequences)} windows of the packaged texts "
                    f"(fewer than the {ctx.sizes.calibration_samples} asked)")
        sparsities, alloc = allocation_with_record(
            method, ctx.sizes.sparsity, lm=lm, calib_sequences=calib.sequences,
            profile_dir=str(prof) if method == "activation" else None)
        report = prune_model(lm.model, calib.sequences, sparsities, "wanda", "unstructured",
                             progress=not ctx.quiet)
        info = {"dataset": calib.dataset, "split": calib.split, "source": calib.source,
                "samples": len(calib.sequences), "seq_len": ctx.sizes.calibration_seq_len,
                "indices": calib.indices}
        record = prune_record(lm, "wanda", "unstructured", alloc, ctx.sizes.sparsity, report,
                              info, seed=ctx.seed)
        save_pruned(lm.model, lm.tokenizer, save, record)
        _say(ctx, f"pruned ({method}): achieved {report['achieved_sparsity']:.4f} -> {save}")
    return note


def _eval_models(ctx: DemoContext) -> dict[str, str]:
    models = {"dense": ctx.model}
    for method in ALLOCATIONS:
        d = ctx.out / "pruned" / method
        if (d / "actpat_prune.json").exists():
            models[f"wanda-{method}"] = str(d)
    return models


def _eval_done(ctx: DemoContext) -> bool:
    if ctx.mode == "probes":
        return (ctx.out / "eval" / SMOKE_FILE).exists()
    return all((ctx.out / "eval" / f"{n}.json").exists() for n in _eval_models(ctx))


def step_eval(ctx: DemoContext) -> str | None:
    from ..evaluation.evaluate import evaluate
    from ..models.loading import load_model
    from ..runs import write_json

    out = ctx.out / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if ctx.mode == "probes":
        return _smoke_eval(ctx, out)
    tasks = ("wikitext2",) + ctx.sizes.zero_shot_tasks
    for name, model in _eval_models(ctx).items():
        path = out / f"{name}.json"
        if path.exists():
            continue
        lm = ctx.load() if name == "dense" else load_model(model, ctx.device)
        # limit: perplexity on the first N windows, zero-shot on the first N items
        results = evaluate(lm.model, lm.tokenizer, list(tasks), ctx.sizes.eval_limit,
                           ctx.sizes.ppl_seq_len, 4, ctx.data_dir, progress=not ctx.quiet)
        write_json(path, results)
    return None


def _smoke_eval(ctx: DemoContext, out: Path) -> str:
    """Perplexity of the dense and pruned models on the packaged held-out prose."""
    from ..data.calibration import packaged_text
    from ..evaluation.evaluate import perplexity, text_corpus
    from ..models.loading import load_model
    from ..runs import versions, write_json

    rows = []
    for name, model in _eval_models(ctx).items():
        lm = ctx.load() if name == "dense" else load_model(model, ctx.device)
        corpus = text_corpus(lm.tokenizer, HELDOUT, packaged_text(HELDOUT),
                             f"package:probes/{HELDOUT}.txt")
        r = perplexity(lm.model, corpus, ctx.sizes.ppl_seq_len, ctx.sizes.eval_limit)
        rows.append({"model": name, "sparsity": 0.0 if name == "dense" else ctx.sizes.sparsity,
                     **r})
    write_json(out / SMOKE_FILE, {
        "kind": "actpat-smoke", "label": SMOKE_LABEL, "corpus": f"probes/{HELDOUT}.txt",
        "calibration": "packaged probe texts (prose, code, questions, arithmetic)",
        "pruner": "wanda", "rows": rows,
        "skipped": {"zero-shot": "no packaged zero-shot tasks",
                    "sts": "no packaged sentence pairs"},
        "seed": ctx.seed, "versions": versions()})
    return "smoke run on packaged texts; zero-shot skipped (no packaged tasks)"


def step_report(ctx: DemoContext) -> str | None:
    from ..outputs.report.page import write_report

    info = write_report([ctx.out], ctx.out / "report.html",
                        title=f"actpat demo: {ctx.model} ({ctx.mode} data)")
    _say(ctx, f"report: {len(info['sections'])} sections -> {info['out']}")
    return None


@dataclass
class Step:
    name: str
    run: object
    done: object  # ctx -> bool
    real_data: bool = False  # skipped with the probe texts


STEPS = [
    Step("profiles", step_profiles,
         lambda c: len(profile_dirs(c)) == len(_profile_datasets(c))),
    Step("figure1", step_figure1, lambda c: (c.out / "figure1.png").exists()
         and (c.out / "counts.json").exists()
         and len(json.loads((c.out / "counts.json").read_text())) == len(profile_dirs(c))),
    Step("relatedness", step_relate, lambda c: (c.out / "relate" / "relate.json").exists()),
    Step("similarity", step_similarity,
         lambda c: (c.out / "similarity" / "similarity.json").exists()),
    Step("sts", step_sts, lambda c: (c.out / "sts" / "sts.json").exists(), real_data=True),
    Step("allocation", step_allocation,
         lambda c: (c.out / "allocation" / "activation.json").exists()),
    Step("prune", step_prune, lambda c: all((c.out / "pruned" / m / "actpat_prune.json").exists()
                                            for m in ALLOCATIONS)),
    Step("eval", step_eval, _eval_done),
    Step("report", step_report, lambda c: False),
]


def run_demo(out: str | Path, model: str = "smollm2-135m", quick: bool = False,
             data_dir: str | None = None, seed: int = 0, device: str = "auto",
             quiet: bool = False, overwrite: bool = False, only: list[str] | None = None) -> dict:
    """Run (or resume) every step; return the state written to ``<out>/demo.json``."""
    from ..runs import prepare_out_dir

    out = prepare_out_dir(out, overwrite, owned=OWNED)
    mode, data_dir, sentence = choose_data(data_dir)
    ctx = DemoContext(out, model, QUICK if quick else FULL, mode, data_dir, seed, device, quiet)
    if (out / STATE_FILE).exists():
        try:
            ctx.steps = json.loads((out / STATE_FILE).read_text()).get("steps", {})
        except ValueError:
            ctx.steps = {}
    _say(ctx, f"model {model}; {sentence}; sizes: {'quick' if quick else 'full'}; seed {seed}")
    start = time.perf_counter()
    for step in STEPS:
        if only and step.name not in only:
            continue
        if step.real_data and mode == "probes":
            ctx.steps[step.name] = {"status": "skipped",
                                    "note": "needs benchmark data (no packaged sentence pairs)"}
            _say(ctx, f"{step.name}: skipped (needs benchmark data: no packaged sentence pairs)")
            continue
        if step.done(ctx):
            _say(ctx, f"{step.name}: done earlier, kept")
            ctx.steps.setdefault(step.name, {"status": "done"})
            continue
        _say(ctx, f"{step.name}: running")
        t0 = time.perf_counter()
        try:
            note = step.run(ctx)
            ctx.steps[step.name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 1),
                                    **({"note": note} if note else {})}
        except UserError as e:
            ctx.steps[step.name] = {"status": "failed", "note": str(e)}
            _say(ctx, f"{step.name}: failed: {e}")
        except Exception as e:  # a bug in a step: keep going, keep the traceback for the record
            import traceback

            ctx.steps[step.name] = {"status": "failed", "note": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-4000:]}
            _say(ctx, f"{step.name}: failed with {type(e).__name__}: {e} (traceback in "
                      f"{out / STATE_FILE})")
        _save_state(ctx)
    ctx.lm = None
    _save_state(ctx)
    total = time.perf_counter() - start
    _say(ctx, f"finished in {total:.0f}s; steps: " + ", ".join(
        f"{k} {v['status']}" for k, v in ctx.steps.items()))
    return json.loads((out / STATE_FILE).read_text())
