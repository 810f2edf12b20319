"""Pruners (a registry): the maths that prunes one (out, in) matrix from its input statistic.

* ``magnitude``: the lowest |W| within each matrix (one threshold per matrix, as in Wanda's
  magnitude baseline); needs no calibration data.
* ``wanda``: score |W_ij| * ||X_j||_2; the lowest round(S_i * in) scores in every output row.
* ``sparsegpt``: optimal-brain-surgeon reconstruction with H = X^T X (dampened by 1% of its
  mean diagonal), columns processed in blocks of 128; the mask of each block is chosen when
  the block is reached (adaptive) from w^2 / [H^-1]_cc^2 over the whole block, and pruned
  weights' errors are compensated on the not yet processed columns. For N:M it chooses the
  pattern inside the OBS sweep, on the updated weights; block counts follow the rounded
  cumulative target, so every matrix ends within one weight of round(S_i * numel).

Adding a pruner is one ``register_pruner(Pruner(name, stat, prune))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..registry import Registry
from .masks import prune_count, matrix_mask, nm_mask, row_mask


@dataclass(frozen=True)
class Pruner:
    """``stat``: the input statistic it needs ("norms", "hessian" or None).
    ``prune(weight (out, in) float32, stat, sparsity, nm) -> new weight (out, in)``."""

    name: str
    stat: str | None
    prune: Callable[[torch.Tensor, torch.Tensor | None, float, tuple[int, int] | None],
                    torch.Tensor]


PRUNERS: Registry[Pruner] = Registry("pruner")


def register_pruner(pruner: Pruner) -> Pruner:
    return PRUNERS.add(pruner.name, pruner)


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(mask, 0.0)


def magnitude_prune(weight, stat, sparsity, nm):
    scores = weight.abs()
    if nm:
        return _apply(weight, nm_mask(scores, *nm))
    return _apply(weight, matrix_mask(scores, prune_count(weight.numel(), sparsity)))


def wanda_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 from the per-column sums of squared inputs."""
    return weight.abs() * sumsq.to(weight.dtype).sqrt().unsqueeze(0)


def wanda_prune(weight, sumsq, sparsity, nm):
    scores = wanda_scores(weight, sumsq)
    return _apply(weight, nm_mask(scores, *nm) if nm else row_mask(scores, sparsity))


def sparsegpt_prune(weight, hessian, sparsity, nm, blocksize: int = 128,
                    percdamp: float = 0.01):
    """SparseGPT (Frantar & Alistarh 2023) for one matrix; returns the pruned, updated weight."""
    w = weight.clone().double()
    rows, cols = w.shape
    if nm and cols % nm[1]:
        nm_mask(w, *nm)  # raises the UserError
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, percdamp)
    target_total = prune_count(rows * cols, sparsity)
    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # cumulative rounding: after this block, round(S * rows * i2) weights are pruned
            count = prune_count(rows * i2, sparsity) - pruned_so_far
            count = min(count, target_total - pruned_so_far)
            mask1 = matrix_mask(w1 ** 2 / d.unsqueeze(0) ** 2, count)
            pruned_so_far += count
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm and i % nm[1] == 0:
                group = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i:i + nm[1]] = nm_mask(group, *nm)
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = percdamp * mean diag(H); the damping
    is raised tenfold (at most three times) if H is numerically not positive definite."""
    mean_diag = torch.diag(h).mean()
    for attempt in range(4):
        damped = h + percdamp * (10 ** attempt) * mean_diag * torch.eye(
            h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise UserError("SparseGPT: the calibration Hessian is not positive definite even with "
                    "1000x damping; use more calibration samples or --pruner wanda")


register_pruner(Pruner("magnitude", None, magnitude_prune))
register_pruner(Pruner("wanda", "norms", wanda_prune))
register_pruner(Pruner("sparsegpt", "hessian", sparsegpt_prune))


def get_pruner(name: str) -> Pruner:
    return PRUNERS.get(name)

