"""Sparsity: per-layer allocation (pure formulas), masks, pruners, the sequential layer-wise loop, saving."""
