"""Per-matrix budgets: one sparsity per scored matrix (q, k, v, o, gate, up, down of each layer).

The paper counts activated weights per matrix type (Figure 1's breakdown), and the types differ
far more than the layers do (on SmolLM2 the value matrices are the most activated). A
*per-matrix* allocator returns ``{matrix type: [S per layer]}``; ``fix_matrix_mean`` brings the
size-weighted mean over every scored matrix to S and clips each value into [0, MAX_SPARSITY],
exactly as ``fix_mean`` does for layers. The result is a ``MatrixSparsities``: a list of the
layers' size-weighted mean S_i (so records, tables and plots that show S_i per layer read it
unchanged) that also carries ``per_matrix``, which the pruning loop reads
(``layerwise.prune_layer``). A per-layer allocation is the special case in which every matrix
of layer i gets S_i.

``activation-matrix``: the paper's formula (docs/method.md section 4) applied over all
matrices instead of all layers, with each matrix's activated *share* d_m = N_m / size_m in
place of N_i (matrices differ in size; layers of one model do not, so for layers the share and
N_i give the same z-scores): z_m = (d_m - mean d) / std d, N'_m = sigmoid(z_m + alpha),
S_m = S + beta*S*(1 - N'_m*M / sum N'), M the number of scored matrices; then
``fix_matrix_mean``. More activated matrices get less sparsity.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .allocation import MAX_SPARSITY, Option, fix_mean, register_allocator


class MatrixSparsities(list):
    """Each layer's size-weighted mean S_i (the list) plus ``per_matrix[type][i]``."""

    def __init__(self, per_matrix: dict[str, list[float]], sizes: dict[str, list[int]]):
        types = list(per_matrix)
        n = len(per_matrix[types[0]])
        if set(types) != set(sizes) or any(len(per_matrix[t]) != n or len(sizes[t]) != n
                                           for t in types):
            raise UserError("per-matrix sparsities and matrix sizes do not match (types "
                            f"{sorted(per_matrix)} vs {sorted(sizes)}); profile and prune "
                            "the same model")
        means = [sum(per_matrix[t][i] * sizes[t][i] for t in types)
                 / sum(sizes[t][i] for t in types) for i in range(n)]
        super().__init__(float(x) for x in means)
        self.per_matrix = {t: [float(x) for x in per_matrix[t]] for t in types}
        self.sizes = {t: [int(x) for x in sizes[t]] for t in types}


def flatten(per_matrix: dict[str, list[float]]) -> list[float]:
    """Type-major order: every layer of the first type, then the next type."""
    return [float(x) for t in per_matrix for x in per_matrix[t]]


def unflatten(values, like: dict[str, list]) -> dict[str, list[float]]:
    out, k = {}, 0
    for t, v in like.items():
        out[t] = [float(x) for x in values[k:k + len(v)]]
        k += len(v)
    return out


def fix_matrix_mean(per_matrix: dict[str, list[float]], sparsity: float,
                    sizes: dict[str, list[int]], cap: float = MAX_SPARSITY) -> MatrixSparsities:
    """``fix_mean`` over every scored matrix: size-weighted mean S, values in [0, cap]."""
    if set(per_matrix) != set(sizes):
        raise UserError(f"sparsities for matrix types {sorted(per_matrix)} but sizes for "
                        f"{sorted(sizes)}; they must match")
    sizes = {t: sizes[t] for t in per_matrix}
    fixed = fix_mean(flatten(per_matrix), sparsity, flatten(sizes), cap)
    return MatrixSparsities(unflatten(fixed, per_matrix), sizes)


def model_matrix_sizes(model) -> dict[str, list[int]]:
    """Weights of each scored matrix: ``{type: [size in layer i]}``."""
    from ..models.architectures import scored_matrices

    sizes: dict[str, dict[int, int]] = {}
    for m in scored_matrices(model):
        sizes.setdefault(m.matrix, {})[m.layer] = m.module.weight.numel()
    return {t: [v[i] for i in range(len(v))] for t, v in sizes.items()}


def expand(layer_sparsities, sizes: dict[str, list[int]]) -> MatrixSparsities:
    """A per-layer allocation as per-matrix values (every matrix of layer i at S_i)."""
    return MatrixSparsities({t: list(map(float, layer_sparsities)) for t in sizes}, sizes)


def activation_matrix_formula(matrix_counts: dict[str, list[int]],
                              matrix_sizes: dict[str, list[int]], sparsity: float,
                              alpha: float = 2.0, beta: float = 0.2) -> dict[str, list[float]]:
    """The activation formula over all matrices, on activated shares N_m / size_m (module doc)."""
    d = np.asarray(flatten(matrix_counts), dtype=np.float64) / np.asarray(
        flatten({t: matrix_sizes[t] for t in matrix_counts}), dtype=np.float64)
    std = d.std()
    z = np.zeros_like(d) if std == 0 else (d - d.mean()) / std
    n_prime = 1.0 / (1.0 + np.exp(-(z + alpha)))
    share = n_prime * len(d) / n_prime.sum()
    return unflatten(sparsity + beta * sparsity * (1.0 - share), matrix_counts)


@register_allocator("activation-matrix", needs=("counts",), per_matrix=True, options=(
    Option("alpha", 2.0, "activation: sigmoid shift (2)"),
    Option("beta", 0.2, "activation: spread (0.2)")))
def activation_matrix(sparsity, *, matrix_counts=None, matrix_sizes=None, alpha=2.0, beta=0.2,
                      **kw) -> dict[str, list[float]]:
    if not matrix_counts or not matrix_sizes:
        raise UserError("the activation-matrix allocation needs activated-weight counts per "
                        "matrix: give --profile RUN (or --model to profile the calibration data)")
    return activation_matrix_formula(matrix_counts, matrix_sizes, sparsity, alpha, beta)
