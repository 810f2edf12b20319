"""Layer-wise sparsity allocation: one target sparsity S_i per decoder layer (a registry).

Every allocator returns a list of S_i, one per decoder layer, whose *parameter-weighted* mean
is the target S (weights: the number of scored weights in each layer) and with every S_i in
[0, 1). The allocators:

* ``uniform``: S_i = S.
* ``activation`` (the paper, docs/method.md section 4): from the activated-weight counts N_i,
  z_i = (N_i - mean N) / std N (population std, ddof=0; z = 0 when all N_i are equal),
  N'_i = sigmoid(z_i + alpha), S_i = S + beta*S*(1 - N'_i*L / sum_j N'_j).  The plain mean of
  these S_i is exactly S; when layer sizes are given and differ, the S_i are then multiplied by
  one common factor so that the parameter-weighted mean is S (for equal layer sizes, the
  paper's setting, the factor is 1 and the formula's numbers are returned unchanged).
* ``owl`` (Yin et al. 2024): outlier ratio O_i = share of the layer's Wanda scores |W|*||X_j||_2
  (all scored matrices of the layer together) above M * their mean; O is normalised to
  [0, 2*lambda] (O~ = (O - min O) / (max O - min O) * 2*lambda) and S_i = 1 - (O~_i - mean O~ +
  1 - S). The input norms come from a dense sequential pass over the calibration data
  (``sparsity.layerwise.collect_input_norms``: each layer sees the outputs of the dense previous
  layers, as OWL's code does before pruning).
* ``alphapruning`` (Lu et al. 2024): heavy-tail exponent alpha of each scored matrix's
  eigenvalue spectrum (eigenvalues of W^T W = squared singular values), fitted by the Hill
  estimator at the xmin that minimises the Kolmogorov-Smirnov distance, averaged over the
  layer's matrices, mapped linearly onto [(1-eps)*S, (1+eps)*S] (largest alpha -> most
  sparsity) and rescaled by one factor so the parameter-weighted mean is S.

* ``atp`` (Huang et al., ICML 2025) and ``dlp`` (Chen et al., ICML 2025): ``allocators_2025``
  (a linear rise with depth whose slope is grid-searched on held-apart calibration windows;
  importance from the median Wanda score of each layer).
* ``search``: ``allocation_search``, the activation allocation improved by a seeded, budgeted,
  resumable mean-preserving evolutionary search scored on held-apart calibration windows.

After an allocator has produced its S_i, ``fix_mean`` enforces the invariants: a common factor
brings the weighted mean to S, values are clipped into [0, MAX_SPARSITY] and the excess is
redistributed over the unclipped layers (repeating until nothing moves).
Adding an allocator is one ``@register_allocator(name, needs=..., options=...)`` function;
``actpat allocate --method`` / ``actpat prune --allocation`` and their flags follow from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..registry import Registry
from .masks import validate_sparsity

MAX_SPARSITY = 0.999  # the largest S_i any allocator returns (S_i < 1: a layer keeps weights)


@dataclass(frozen=True)
class Option:
    """One setting of an allocator: the keyword ``name`` of ``allocate`` and the command-line
    flag ``--name`` (underscores as dashes) of ``actpat allocate`` and ``actpat prune``."""

    name: str
    default: float
    help: str


@dataclass(frozen=True)
class Allocator:
    """``fn(sparsity, *, counts, layer_sizes, model, calib_inputs, **options) -> S_i``.

    ``needs``: what the allocator reads besides S: ``"counts"`` (activated-weight counts N_i,
    from a profile), ``"model"`` (the weights), ``"calibration"`` (token sequences; implies the
    model), ``"held"`` (held-apart calibration windows that score candidates: ``atp``,
    ``search``). The command line loads exactly what ``needs`` names and records ``options``.
    """

    name: str
    fn: Callable[..., list[float]]
    needs: frozenset[str] = frozenset()
    options: tuple[Option, ...] = ()


ALLOCATORS: Registry[Allocator] = Registry("allocation")


def register_allocator(name: str, *, needs: tuple[str, ...] = (), options: tuple[Option, ...] = ()):
    """Decorator: register ``fn`` as the allocator ``name`` (one entry; the CLI follows)."""
    def deco(fn):
        ALLOCATORS.add(name, Allocator(name, fn, frozenset(needs), tuple(options)))
        return fn
    return deco


def fix_mean(values, sparsity: float, sizes: list[int] | None = None,
             cap: float = MAX_SPARSITY) -> list[float]:
    """Scale so the size-weighted mean is ``sparsity``; clip into [0, cap], redistributing."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    w = np.ones_like(v) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if len(w) != len(v):
        raise UserError(f"{len(v)} layer sparsities but {len(w)} layer sizes; they must match")
    target = sparsity * w.sum()
    if sparsity == 0:
        return [0.0] * len(v)
    fixed = np.zeros(len(v), dtype=bool)  # layers clipped at the cap
    for _ in range(len(v) + 1):
        free = ~fixed
        rest = target - (v[fixed] * w[fixed]).sum()
        current = (v[free] * w[free]).sum()
        if current <= 0:  # all free layers at 0: spread the rest evenly
            v[free] = rest / w[free].sum()
        else:
            v[free] *= rest / current
        over = free & (v > cap)
        if not over.any():
            break
        v[over] = cap
        fixed |= over
    return [float(x) for x in v]


def allocate(method: str, sparsity: float, *, counts=None, layer_sizes: list[int] | None = None,
             model=None, calib_inputs=None, **kw) -> list[float]:
    """S_i per decoder layer for target ``sparsity`` by the allocator ``method``.

    ``counts``: the activated-weight counts N_i (``activation``): a list, or the ``Counts`` of
    ``activation.profiling.counts`` (its ``scored_per_layer`` then gives the layer sizes).
    ``layer_sizes``: scored weights per layer (taken from ``model`` when omitted and a model is
    given). ``model`` and ``calib_inputs`` (equal-length token sequences): needed by ``owl`` (and
    ``model`` by ``alphapruning``). Extra keywords are the allocator's options (``alpha``,
    ``beta``, ``owl_m``, ``owl_lambda``, ``eps``) or ``batch_size``, ``progress``, ``num_layers``.
    """
    entry = ALLOCATORS.get(method)
    sparsity = validate_sparsity(sparsity)
    if hasattr(counts, "layer_counts"):
        layer_sizes = layer_sizes or counts.scored_per_layer
        counts = counts.layer_counts
    if layer_sizes is None and model is not None:
        layer_sizes = model_layer_sizes(model)
    options = {o.name: kw.pop(o.name, o.default) for o in entry.options}
    out = entry.fn(sparsity, counts=counts, layer_sizes=layer_sizes, model=model,
                   calib_inputs=calib_inputs, **options, **kw)
    return fix_mean(out, sparsity, layer_sizes)


def model_layer_sizes(model) -> list[int]:
    """Number of scored weights in each decoder layer."""
    from ..models.loading import scored_matrices

    sizes: dict[int, int] = {}
    for m in scored_matrices(model):
        sizes[m.layer] = sizes.get(m.layer, 0) + m.module.weight.numel()
    return [sizes[i] for i in range(len(sizes))]


def _num_layers(counts, layer_sizes, model, kw) -> int:
    for x in (counts, layer_sizes):
        if x is not None:
            return len(x)
    if model is not None:
        from ..models.loading import decoder_layers

        return len(decoder_layers(model))
    if kw.get("num_layers"):
        return int(kw["num_layers"])
    raise UserError("the uniform allocation needs the number of layers: give a model, "
                    "layer sizes or num_layers")


@register_allocator("uniform")
def uniform(sparsity, *, counts=None, layer_sizes=None, model=None, **kw) -> list[float]:
    return [sparsity] * _num_layers(counts, layer_sizes, model, kw)


def activation_formula(counts, sparsity: float, alpha: float = 2.0,
                       beta: float = 0.2) -> list[float]:
    """docs/method.md section 4 literally: z-score, sigmoid(z + alpha), S + bS(1 - N'_i L / sum N')."""
    n = np.asarray(counts, dtype=np.float64)
    std = n.std()
    z = np.zeros_like(n) if std == 0 else (n - n.mean()) / std
    n_prime = 1.0 / (1.0 + np.exp(-(z + alpha)))
    share = n_prime * len(n) / n_prime.sum()
    return [float(x) for x in sparsity + beta * sparsity * (1.0 - share)]


@register_allocator("activation", needs=("counts",), options=(
    Option("alpha", 2.0, "activation: sigmoid shift (2)"),
    Option("beta", 0.2, "activation: spread (0.2)")))
def activation(sparsity, *, counts=None, alpha=2.0, beta=0.2, **kw) -> list[float]:
    if counts is None:
        raise UserError("the activation allocation needs activated-weight counts: give "
                        "--profile RUN (or --model to profile the calibration data)")
    if len(counts) < 2:
        raise UserError("the activation allocation needs at least two layers")
    return activation_formula(counts, sparsity, alpha, beta)


def owl_formula(ratios, sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's mapping of outlier ratios to sparsities (S_i = 1 - (O~_i - mean O~ + 1 - S))."""
    o = np.asarray(ratios, dtype=np.float64)
    span = o.max() - o.min()
    o_t = np.zeros_like(o) if span == 0 else (o - o.min()) / span * 2 * lam
    return [float(x) for x in 1.0 - (o_t - o_t.mean() + 1.0 - sparsity)]


def outlier_ratio(scores: list, m: float = 5.0) -> float:
    """Share of all entries of ``scores`` (tensors) above m times their mean."""
    import torch

    flat = torch.cat([s.flatten().double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


@register_allocator("owl", needs=("model", "calibration"), options=(
    Option("owl_m", 5.0, "owl: outlier multiple M (5)"),
    Option("owl_lambda", 0.08, "owl: lambda (0.08)")))
def owl(sparsity, *, model=None, calib_inputs=None, owl_m=5.0, owl_lambda=0.08,
        batch_size=8, progress=False, **kw) -> list[float]:
    if model is None or calib_inputs is None:
        raise UserError("the owl allocation needs the model and calibration data (Wanda "
                        "scores): give --model and --calibration")
    from ..models.loading import scored_matrices
    from .layerwise import collect_input_norms

    norms = collect_input_norms(model, calib_inputs, batch_size=batch_size, progress=progress)
    per_layer: dict[int, list] = {}
    for sm in scored_matrices(model):
        score = sm.weight.detach().abs().float() * norms[sm.name].unsqueeze(0)
        per_layer.setdefault(sm.layer, []).append(score)
    ratios = [outlier_ratio(per_layer[i], owl_m) for i in range(len(per_layer))]
    return owl_formula(ratios, sparsity, owl_lambda)


def hill_alpha(eigenvalues, tol: float = 1e-10) -> float:
    """Power-law exponent of a spectrum: Hill estimator at the KS-best xmin.

    For each candidate xmin = lambda_k (sorted ascending, all but the largest), with the tail
    lambda_k..lambda_{n-1} of m values: alpha_k = 1 + m / sum_j ln(lambda_j / xmin), and the
    Kolmogorov-Smirnov distance between the tail's empirical CDF (j-k)/m and the fitted
    1 - (lambda_j / xmin)^(1 - alpha_k). Returns alpha at the smallest distance. Eigenvalues
    below ``tol`` times the largest are dropped (numerical zeros).
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    lam = lam[lam > tol * lam.max()] if lam.size and lam.max() > 0 else lam[:0]
    n = lam.size
    if n < 3:
        raise UserError("a matrix has fewer than 3 non-zero eigenvalues; alphapruning cannot "
                        "fit its spectrum")
    logs = np.log(lam)
    k = np.arange(n - 1)
    m = n - k
    suffix = np.cumsum(logs[::-1])[::-1]  # sum of logs from k to the end
    denom = suffix[k] - m * logs[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + m / denom
    j = np.arange(n)
    # ratio[k, j] = lambda_j / lambda_k for j >= k; ecdf[k, j] = (j - k) / m_k
    ratio = lam[None, :] / lam[k][:, None]
    valid = j[None, :] >= k[:, None]
    ecdf = (j[None, :] - k[:, None]) / m[:, None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fitted = 1.0 - ratio ** (1.0 - alphas[:, None])
    dist = np.where(valid, np.abs(fitted - ecdf), 0.0).max(axis=1)
    ok = np.isfinite(alphas) & (alphas > 1) & (denom > 0)
    if not ok.any():
        return float("nan")
    dist = np.where(ok, dist, np.inf)
    return float(alphas[int(np.argmin(dist))])


def matrix_alpha(weight) -> float:
    import torch

    s = torch.linalg.svdvals(weight.detach().double().cpu())
    return hill_alpha((s ** 2).numpy())


def alphapruning_formula(block_alphas, sparsity: float, eps: float = 0.3,
                         layer_sizes: list[int] | None = None) -> list[float]:
    """Linear map of per-layer alpha onto [(1-eps)S, (1+eps)S], then rescaled to weighted mean S."""
    a = np.asarray(block_alphas, dtype=np.float64)
    span = a.max() - a.min()
    unit = np.full_like(a, 0.5) if span == 0 else (a - a.min()) / span
    ratios = (1 - eps) + unit * 2 * eps
    w = np.ones_like(a) if layer_sizes is None else np.asarray(layer_sizes, dtype=np.float64)
    scale = sparsity * w.sum() / (ratios * w).sum()
    return [float(x) for x in ratios * scale]


@register_allocator("alphapruning", needs=("model",), options=(
    Option("eps", 0.3, "alphapruning: epsilon (0.3)"),))
def alphapruning(sparsity, *, model=None, layer_sizes=None, eps=0.3, **kw) -> list[float]:
    if model is None:
        raise UserError("the alphapruning allocation needs the model's weights: give --model")
    from ..models.loading import scored_matrices

    per_layer: dict[int, list[float]] = {}
    for sm in scored_matrices(model):
        per_layer.setdefault(sm.layer, []).append(matrix_alpha(sm.weight))
    block = [float(np.nanmean(per_layer[i])) for i in range(len(per_layer))]
    if not np.isfinite(block).all():
        raise UserError("alphapruning could not fit the spectrum of some layer; use another "
                        "allocation")
    return alphapruning_formula(block, sparsity, eps, layer_sizes or model_layer_sizes(model))


# --------------------------------------------------------------------------- counts from profiles


def check_profile(profile, lm) -> None:
    """UserError unless ``profile`` was computed on ``lm``'s weights (identity and modules)."""
    from ..models.loading import scored_matrices

    theirs = profile.meta.get("model") or {}
    ours = lm.identity or {}
    if theirs.get("sha256") and ours.get("sha256"):
        same = theirs["sha256"] == ours["sha256"]
    elif theirs.get("path") and ours.get("path"):
        same = str(theirs["path"]).rstrip("/") == str(ours["path"]).rstrip("/")
    else:
        same = True  # nothing recorded to compare: fall back to the module check
    shapes = {m.name: tuple(m.module.weight.shape) for m in scored_matrices(lm.model)}
    theirs_shapes = {k: tuple(v.shape) for k, v in profile.maps.items()}
    if not same or shapes != theirs_shapes:
        raise UserError(f"the profile was computed on model '{theirs.get('spec', '?')}', not on "
                        f"'{ours.get('spec', '?')}' (different weights or modules); profile this "
                        "model with `actpat profile` or drop --profile")


def activation_counts(*, profile_dir=None, lm=None, calib_sequences=None, gamma=None,
                      gamma_quantile=None, batch_size: int = 4, progress: bool = False,
                      meta: dict | None = None):
    """The N_i for the ``activation`` allocator: from a saved profile (checked against ``lm``
    when given) or by profiling ``calib_sequences`` on ``lm`` now. gamma defaults to the
    0.1 quantile (10% of all scored weights count as activated). Returns (Counts, info)."""
    from ..activation.profiling import Profile, compute_profile, counts

    if gamma is None and gamma_quantile is None:
        gamma_quantile = 0.1
    if profile_dir is not None:
        profile = Profile.load(profile_dir)
        if lm is not None:
            check_profile(profile, lm)
        source = {"profile": str(profile_dir), "dataset": profile.meta.get("dataset"),
                  "samples": profile.meta.get("samples")}
    else:
        if lm is None or calib_sequences is None:
            raise UserError("the activation allocation needs counts: give --profile RUN, or "
                            "--model (the calibration data is then profiled)")
        profile = compute_profile(lm, calib_sequences, batch_size, meta=meta, progress=progress)
        source = {"profile": "computed on the calibration data", "samples": len(calib_sequences)}
    c = counts(profile, gamma, gamma_quantile)
    source.update(gamma=c.gamma, gamma_rule=c.gamma_rule, counts=c.layer_counts)
    return c, source


def allocation_with_record(method: str, sparsity: float, *, lm=None, calib_sequences=None,
                           profile_dir=None, gamma=None, gamma_quantile=None,
                           options: dict | None = None, profile_samples: int = 64,
                           batch_size: int = 8, progress: bool = False, held_sequences=None,
                           state_path=None) -> tuple[list[float], dict]:
    """(S_i, the record ``actpat allocate --json`` writes) for allocator ``method``.

    ``lm``: the loaded model when at hand; ``calib_sequences``: calibration windows (the first
    ``profile_samples`` are profiled for counts when no ``profile_dir`` is given); ``options``:
    the allocator's options (defaults for the missing ones); ``held_sequences``: held-apart
    calibration windows (allocators that need ``"held"``); ``state_path``: where a resumable
    allocator (``search``) keeps its state. The allocator may add what it chose to the record.
    """
    entry = ALLOCATORS.get(method)
    sparsity = validate_sparsity(sparsity)
    options = options or {}
    kw = {o.name: options.get(o.name, o.default) for o in entry.options}
    info = {"method": method, "sparsity": sparsity, **kw}
    if "counts" in entry.needs:
        seqs = None if calib_sequences is None else calib_sequences[:profile_samples]
        c, src = activation_counts(profile_dir=profile_dir, lm=lm, calib_sequences=seqs,
                                   gamma=gamma, gamma_quantile=gamma_quantile, progress=progress)
        info["counts"] = src
        kw.update(counts=c.layer_counts, layer_sizes=c.scored_per_layer)
    if "calibration" in entry.needs:
        kw.update(batch_size=batch_size, progress=progress)
    if "held" in entry.needs:
        if not held_sequences:
            raise UserError(f"the {method} allocation needs held-apart calibration windows: "
                            "give --held-windows of at least 1")
        kw.update(held_inputs=held_sequences, search_state=state_path)
    if entry.needs & {"model", "calibration"} and lm is None:
        raise UserError(f"the {method} allocation needs the model: give --model")
    if not entry.needs and lm is None and profile_dir is None:
        raise UserError(f"the {method} allocation needs the layer count: give --model or "
                        "--profile")
    if not entry.needs and lm is None:
        from ..activation.profiling import Profile

        kw["num_layers"] = Profile.load(profile_dir).num_layers
    s = allocate(method, sparsity, model=None if lm is None else lm.model,
                 calib_inputs=calib_sequences, info=info, **kw)
    info["layer_sparsities"] = s
    return s, info


# the 2025 allocators and the search register themselves (they import from this module)
from . import allocation_search, allocators_2025  # noqa: E402,F401
