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
This module holds the registry and the paper's allocators; ``sparsity.allocators`` imports it
and the 2025 allocators and the search, and runs any of them by name (``allocate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..registry import Registry

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
    per_matrix: bool = False  # fn returns {matrix type: [S per layer]} (``sparsity.per_matrix``)


ALLOCATORS: Registry[Allocator] = Registry("allocation")


def register_allocator(name: str, *, needs: tuple[str, ...] = (), options: tuple[Option, ...] = (),
                       per_matrix: bool = False):
    """Decorator: register ``fn`` as the allocator ``name`` (one entry; the CLI follows).
    ``per_matrix``: ``fn`` returns one sparsity per scored matrix (``sparsity.per_matrix``)."""
    def deco(fn):
        ALLOCATORS.add(name, Allocator(name, fn, frozenset(needs), tuple(options), per_matrix))
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


def model_layer_sizes(model) -> list[int]:
    """Number of scored weights in each decoder layer."""
    from ..models.architectures import scored_matrices

    sizes: dict[int, int] = {}
    for m in scored_matrices(model):
        sizes[m.layer] = sizes.get(m.layer, 0) + m.module.weight.numel()
    return [sizes[i] for i in range(len(sizes))]


def _num_layers(counts, layer_sizes, model, kw) -> int:
    for x in (counts, layer_sizes):
        if x is not None:
            return len(x)
    if model is not None:
        from ..models.architectures import decoder_layers

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
    from ..models.architectures import scored_matrices
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
    from ..models.architectures import scored_matrices

    per_layer: dict[int, list[float]] = {}
    for sm in scored_matrices(model):
        per_layer.setdefault(sm.layer, []).append(matrix_alpha(sm.weight))
    block = [float(np.nanmean(per_layer[i])) for i in range(len(per_layer))]
    if not np.isfinite(block).all():
        raise UserError("alphapruning could not fit the spectrum of some layer; use another "
                        "allocation")
    return alphapruning_formula(block, sparsity, eps, layer_sizes or model_layer_sizes(model))
