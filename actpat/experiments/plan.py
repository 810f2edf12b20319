"""The plans of the paper's pruning experiments: Table 1 (validation 1) and calibration
specificity (validation 2), each a list of configurations (``runner`` runs them).

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

from dataclasses import dataclass
from pathlib import Path

from ..evaluation.evaluate import PERPLEXITY_SPLITS

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


def _seeded_rows(sparsities, seeds, seeded) -> list[Config]:
    """The Wanda rows of the ``seeded`` allocations for every seed after the first."""
    return [Config("wanda", a, s, seed=seed)
            for seed in seeds[1:] for s in sparsities for a in seeded]


def table1_configs(sparsities=(0.5, 0.6, 0.7), seeds=(0, 1, 2), zero_shot: bool = True,
                   tasks: tuple[str, ...] = ZERO_SHOT,
                   seeded: tuple[str, ...] = ("uniform", "activation"),
                   allocations=("uniform", "activation", "owl", "alphapruning"),
                   sparsegpt: bool = True, nm: bool = True) -> list[Config]:
    """Table 1 in priority order: the cheapest most informative configurations first.

    ``seeds`` beyond the first apply to the Wanda rows of the ``seeded`` allocations at every
    sparsity: those of the first sparsities (50% and 60% when asked, else the first one given)
    right after their seed-0 rows, those of the higher ones after the other allocators."""
    out = [Config(None)]
    first = [s for s in sparsities if s in (0.5, 0.6)] or list(sparsities)[:1]
    rest = [s for s in sparsities if s not in first]
    for s in first:  # 1. magnitude, Wanda uniform vs activation, seed 0
        out += [Config("magnitude", "uniform", s), Config("wanda", "uniform", s),
                Config("wanda", "activation", s)]
    out += _seeded_rows(first, seeds, seeded)  # 2. seeds of the rows the verdict rests on
    for s in list(first) + rest:  # 3. the other allocators and SparseGPT, higher sparsity
        if s in rest:
            out += [Config("magnitude", "uniform", s), Config("wanda", "uniform", s),
                    Config("wanda", "activation", s)]
        out += [Config("wanda", a, s) for a in allocations if a not in ("uniform", "activation")]
        if sparsegpt:
            out += [Config("sparsegpt", "uniform", s), Config("sparsegpt", "activation", s)]
    out += _seeded_rows(rest, seeds, seeded)  # the seeds of the higher sparsities
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


def result_path(out: str | Path, cfg: Config) -> Path:
    return Path(out) / CONFIG_DIR / f"{cfg.name}.json"
