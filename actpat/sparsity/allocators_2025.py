"""The 2025 layer-wise sparsity allocators: ATP and DLP, as pure formulas plus their inputs.

* **ATP** (Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a
  Theoretical Perspective", ICML 2025, arXiv 2502.14770). Sparsity rises linearly with depth,
  an arithmetic progression with common difference beta:

      S_i = c + beta * i,   i = 0 .. L-1,

  with c chosen so that the parameter-weighted mean of the S_i is the target S. For equal layer
  sizes (the paper's and the authors' code's setting) c = S - beta (L-1)/2, the paper's rule;
  for unequal sizes we keep the common difference and shift all layers by one constant (our
  choice: the paper never meets unequal layers). A beta is legal when every S_i lies in
  [0, MAX_SPARSITY]: beta <= min(S / i_bar, (cap - S) / (L-1 - i_bar)), i_bar the size-weighted
  mean layer index; with equal sizes and cap 1 that is the authors' bound
  min(2S/(L-1), 2(1-S)/(L-1)). beta is picked by a grid search: beta = step, 2 step, ... up to
  the largest legal beta (the authors' script walks step 0.002 from 0.002 until the bound),
  keeping the beta of lowest loss (ties: the smaller beta). The authors' script scores each
  beta by WikiText-2 *test* perplexity, i.e. on the evaluation data; here the loss is always
  computed on held-apart calibration windows (``atp_grid_search`` takes any loss function;
  ``actpat.sparsity.allocation_search.MaskScorer`` is the one actpat uses).
* **DLP** (Chen et al., "DLP: Dynamic Layerwise Pruning in Large Language Models", ICML 2025,
  arXiv 2505.23807). A layer's *unimportance* u_i is the median of its Wanda scores
  |W_jk| * ||X_k||_2 (all scored matrices of the layer together; the median is robust to the
  outlier weights that dominate a mean). Input norms come from a dense sequential pass (each
  layer sees the dense previous layers' outputs, as the authors' code and OWL do). The
  relative importance I_i = 1 - u_i / sum_j u_j is min-max scaled to [0, 2 alpha]
  (I~_i = (I_i - min I) / (max I - min I) * 2 alpha), and, as for OWL, the kept share of layer i
  is I~_i - mean I~ + 1 - S, so S_i = S - (I~_i - mean I~): the layers with the largest median
  score (least important, the paper's reading) are pruned most. alpha = 0.15 is the authors'
  default. The median is torch's (the lower of the two middle values for an even count).

Both return S_i whose plain mean is S (equal sizes); ``actpat.sparsity.allocators.allocate``
then applies ``fix_mean`` (weighted mean S, bounds), which leaves a legal ATP schedule unchanged.
Each is one registered allocator (``atp``, ``dlp``) at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .allocation import MAX_SPARSITY, Option, register_allocator
from .allocation_search import HELD_OPTION
from ..errors import UserError

ATP_STEP = 0.002  # the authors' grid step (and first value) for beta
DLP_ALPHA = 0.15  # the authors' default half-width of the sparsity range


# --------------------------------------------------------------------------- ATP


def _weights(num_layers: int, layer_sizes: Sequence[int] | None) -> np.ndarray:
    if layer_sizes is None:
        return np.ones(num_layers, dtype=np.float64)
    if len(layer_sizes) != num_layers:
        raise UserError(f"{num_layers} layers but {len(layer_sizes)} layer sizes; they must match")
    return np.asarray(layer_sizes, dtype=np.float64)


def atp_schedule(sparsity: float, beta: float, num_layers: int,
                 layer_sizes: Sequence[int] | None = None) -> list[float]:
    """S_i = c + beta * i with the size-weighted mean of the S_i equal to ``sparsity``."""
    if num_layers < 2:
        raise UserError("the atp allocation needs at least two layers")
    w = _weights(num_layers, layer_sizes)
    i = np.arange(num_layers, dtype=np.float64)
    c = sparsity - beta * float((w * i).sum() / w.sum())
    return [float(x) for x in c + beta * i]


def atp_max_beta(sparsity: float, num_layers: int, layer_sizes: Sequence[int] | None = None,
                 cap: float = MAX_SPARSITY) -> float:
    """The largest beta whose schedule keeps every S_i in [0, cap]."""
    w = _weights(num_layers, layer_sizes)
    i_bar = float((w * np.arange(num_layers)).sum() / w.sum())
    return max(0.0, min(sparsity / i_bar, (cap - sparsity) / (num_layers - 1 - i_bar)))


def atp_grid(sparsity: float, num_layers: int, layer_sizes: Sequence[int] | None = None,
             step: float = ATP_STEP, cap: float = MAX_SPARSITY) -> list[float]:
    """beta = step, 2 step, ... while legal (the authors' walk); empty when even step is not."""
    if not step > 0 or math.isnan(step):
        raise UserError(f"the atp grid step must be > 0 (got {step}); e.g. --atp-step 0.002")
    top = atp_max_beta(sparsity, num_layers, layer_sizes, cap)
    count = int(math.floor(top / step + 1e-9))
    return [round(k * step, 12) for k in range(1, count + 1)]


def atp_grid_search(sparsity: float, loss: Callable[[list[float]], float], num_layers: int,
                    layer_sizes: Sequence[int] | None = None, step: float = ATP_STEP,
                    grid: Sequence[float] | None = None, log=None) -> dict:
    """Score every beta of the grid with ``loss(S_i)``; keep the lowest (ties: smaller beta).

    Returns {"beta", "sparsities", "loss", "trials": [{"beta", "loss"}, ...]}. With no legal
    beta (S so close to 0 or 1 that even one step leaves the bounds) the uniform schedule
    (beta = 0) is returned unscored.
    """
    betas = list(grid) if grid is not None else atp_grid(sparsity, num_layers, layer_sizes, step)
    if not betas:
        return {"beta": 0.0, "sparsities": atp_schedule(sparsity, 0.0, num_layers, layer_sizes),
                "loss": None, "trials": []}
    trials = []
    best = None
    for beta in betas:
        value = float(loss(atp_schedule(sparsity, beta, num_layers, layer_sizes)))
        trials.append({"beta": beta, "loss": value})
        if log is not None:
            log(f"atp: beta {beta:.4f} -> calibration loss {value:.5f}")
        if best is None or value < best["loss"]:
            best = trials[-1]
    return {"beta": best["beta"], "loss": best["loss"], "trials": trials,
            "sparsities": atp_schedule(sparsity, best["beta"], num_layers, layer_sizes)}


# --------------------------------------------------------------------------- DLP


def dlp_formula(medians: Sequence[float], sparsity: float, alpha: float = DLP_ALPHA) -> list[float]:
    """S_i from the per-layer median Wanda scores u_i (see the module doc)."""
    u = np.asarray(medians, dtype=np.float64)
    if len(u) < 2:
        raise UserError("the dlp allocation needs at least two layers")
    total = u.sum()
    if not np.isfinite(u).all() or total <= 0:
        raise UserError("the dlp allocation needs finite, non-negative median scores with a "
                        "positive sum; check the calibration data")
    importance = 1.0 - u / total
    span = importance.max() - importance.min()
    scaled = np.zeros_like(importance) if span == 0 else \
        (importance - importance.min()) / span * 2 * alpha
    return [float(x) for x in sparsity - (scaled - scaled.mean())]


def layer_median_scores(model, calib_inputs, batch_size: int = 8,
                        progress: bool = False) -> list[float]:
    """u_i: the median of all Wanda scores |W| * ||X||_2 of layer i's scored matrices, input
    norms from a dense sequential pass over ``calib_inputs``."""
    import torch

    from ..models.architectures import scored_matrices
    from .layerwise import collect_input_norms

    norms = collect_input_norms(model, calib_inputs, batch_size=batch_size, progress=progress)
    per_layer: dict[int, list] = {}
    for sm in scored_matrices(model):
        score = sm.weight.detach().abs().float() * norms[sm.name].unsqueeze(0)
        per_layer.setdefault(sm.layer, []).append(score.flatten())
    return [float(torch.cat(per_layer[i]).median()) for i in range(len(per_layer))]


# --------------------------------------------------------------------------- allocator entries


@register_allocator("atp", needs=("model", "calibration", "held"), options=(
    Option("atp_step", ATP_STEP, "atp: grid step (and first value) of the slope beta (0.002)"),
    HELD_OPTION))
def atp_allocation(sparsity, *, model=None, calib_inputs=None, held_inputs=None,
                   layer_sizes=None, atp_step: float = ATP_STEP, batch_size: int = 8,
                   progress: bool = False, info: dict | None = None, **kw) -> list[float]:
    """``atp``: the grid's beta of lowest calibration perplexity on ``held_inputs``, each beta
    scored by ``MaskScorer`` (Wanda masks from one sequential pass at uniform S)."""
    if model is None or calib_inputs is None or not held_inputs:
        raise UserError("the atp allocation needs the model, calibration data and held-apart "
                        "calibration windows: give --model and --calibration")
    from .allocation_search import MaskScorer
    from ..models.architectures import decoder_layers

    n = len(decoder_layers(model))
    with MaskScorer(model, calib_inputs, held_inputs, [sparsity] * n, metric="ppl",
                    batch_size=batch_size, progress=progress) as scorer:
        out = atp_grid_search(sparsity, scorer, n, layer_sizes, atp_step)
    if info is not None:
        info.update(atp={"beta": out["beta"], "step": atp_step, "metric": "calibration ppl",
                         "held_windows": len(held_inputs), "trials": out["trials"]})
    return out["sparsities"]


@register_allocator("dlp", needs=("model", "calibration"), options=(
    Option("dlp_alpha", DLP_ALPHA, "dlp: half-width alpha of the sparsity range (0.15)"),))
def dlp_allocation(sparsity, *, model=None, calib_inputs=None, dlp_alpha: float = DLP_ALPHA,
                   batch_size: int = 8, progress: bool = False, info: dict | None = None,
                   **kw) -> list[float]:
    """``dlp``: ``dlp_formula`` of the layers' median Wanda scores on ``calib_inputs``."""
    if model is None or calib_inputs is None:
        raise UserError("the dlp allocation needs the model and calibration data (Wanda "
                        "scores): give --model and --calibration")
    medians = layer_median_scores(model, calib_inputs, batch_size, progress)
    if info is not None:
        info.update(dlp={"alpha": dlp_alpha, "medians": medians})
    return dlp_formula(medians, sparsity, dlp_alpha)
