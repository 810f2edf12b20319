"""Figures (matplotlib, Agg backend): one function per figure, each writing a PNG to a path or
to a binary file object (the report embeds them from memory)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path, tight: bool = True) -> None:
    if not hasattr(path, "write"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, format="png", dpi=120 if tight else 100,
                bbox_inches=None if tight else "tight")  # tight_layout ignores a shared colorbar
    plt.close(fig)


def png_bytes(plot, *args, **kwargs) -> bytes:
    """The PNG that ``plot(*args, path, **kwargs)`` draws, in memory."""
    import io

    buf = io.BytesIO()
    plot(*args, buf, **kwargs)
    return buf.getvalue()


def _finish_layer_plot(fig, ax, path, ylabel: str, title: str, legend_size: int = 7,
                       ncol: int = 1) -> None:
    """Common ending of the per-layer line charts: labels, legend, grid, save."""
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size, ncol=ncol)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_layer_counts(results: list[dict], path, title: str | None = None) -> None:
    """Figure 1: activated weights per layer, one line per run (as a share of the layer)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        share = [c / s for c, s in zip(r["layer_counts"], r["scored_per_layer"])]
        ax.plot(range(len(share)), share, marker="o", ms=3, label=str(r.get("dataset") or r["run"]))
    gammas = {r["gamma_rule"] for r in results}
    _finish_layer_plot(fig, ax, path, "share of weights activated (A > γ)",
                       title or f"Activated weights per layer (γ: {', '.join(sorted(gammas))})",
                       ncol=2)


# --------------------------------------------------------------------------- similarity (issue 3)


def plot_similarity_boxes(comparisons: list[dict], path, title: str | None = None) -> None:
    """Figures 2-5 style: per layer, a box of pair similarities for each comparison."""
    import numpy as np

    n = len(comparisons)
    layers = len(comparisons[0]["per_pair"][0])
    fig, ax = plt.subplots(figsize=(max(7, layers * 0.35 * max(1, n)), 4))
    width = 0.8 / n
    for c, comp in enumerate(comparisons):
        data = np.array(comp["per_pair"], dtype=float)
        pos = np.arange(layers) + (c - (n - 1) / 2) * width
        cols = [d[np.isfinite(d)] for d in data.T]
        bp = ax.boxplot(cols, positions=pos, widths=width * 0.9, patch_artist=True,
                        showfliers=False, manage_ticks=False)
        color = f"C{c}"
        for box in bp["boxes"]:
            box.set(facecolor=color, alpha=0.5)
        a, b = comp["datasets"]
        ax.plot([], [], color=color, lw=6, alpha=0.5,
                label=f"{a} (within)" if comp["kind"] == "within" else f"{a} × {b}")
    ax.set_xticks(range(layers))
    ax.set_xticklabels([str(i) for i in range(layers)], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("activation-pattern similarity")
    ax.set_title(title or "Pair similarity per layer", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_similarity_panels(comparisons: list[dict], path) -> None:
    """One panel per comparison (at most three a row): a box of pair similarities per layer."""
    import math

    shown = comparisons
    n = len(shown)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False,
                             sharey=True)
    for ax, c in zip(axes.flat, shown):
        per_pair = [[v for v in col if v is not None and math.isfinite(v)]
                    for col in zip(*c["per_pair"])]
        ax.boxplot(per_pair, positions=range(len(per_pair)), widths=0.6, showfliers=False)
        ticks = list(range(0, len(per_pair), max(1, len(per_pair) // 8)))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.tick_params(labelsize=7)
        ax.set_title(comparison_name(c), fontsize=9)
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("pattern similarity", fontsize=8)
    _save(fig, path)


def comparison_name(c: dict) -> str:
    """``within X`` or ``X vs Y``: how figures and the report name a comparison."""
    a, b = (c.get("datasets") or ["?", "?"])[:2]
    return f"within {a}" if c.get("kind") == "within" else f"{a} vs {b}"


def plot_similarity_medians(comparisons: list[dict], path, title: str | None = None) -> None:
    """Median pair similarity per layer, one line per comparison (within solid, cross dashed)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, comp in enumerate(comparisons):
        med = [float("nan") if v is None else v for v in comp["summary"]["median"]]
        a, b = comp["datasets"]
        within = comp["kind"] == "within"
        ax.plot(range(len(med)), med, ls="-" if within else "--", marker="o" if within else None,
                ms=3, color=f"C{c % 10}", label=f"{a} (within)" if within else f"{a} × {b}")
    _finish_layer_plot(fig, ax, path, "median pair similarity",
                       title or "Within- (solid) vs cross-domain (dashed) similarity", 6, 2)


def plot_relatedness(names: list[str], matrix, path, title: str | None = None) -> None:
    """Figure 6 style: dataset x dataset similarity heatmap."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.8 + 0.65 * len(names)))
    off = m[~np.eye(len(m), dtype=bool)]
    im = ax.imshow(m, cmap="viridis", vmin=float(off.min()) if off.size else 0, vmax=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] < (off.min() + 1) / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "Dataset similarity", fontsize=9)
    _save(fig, path)


def plot_band_heatmaps(names: list[str], matrices: dict, path) -> None:
    """One annotated dataset x dataset heatmap per band (title -> matrix), side by side on one
    colour scale; only the first panel carries the row labels, so none overprints its neighbour."""
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(1.2 + 3.4 * len(matrices), 3.9),
                             squeeze=False, sharey=True, constrained_layout=True)
    low = min(0.5, min(float(np.min(m)) for m in matrices.values()))
    for k, (ax, (title, m)) in enumerate(zip(axes[0], matrices.items())):
        m = np.asarray(m, dtype=float)
        im = ax.imshow(m, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        if k == 0:
            ax.set_yticks(range(len(names)), names, fontsize=7)
        else:
            ax.tick_params(labelleft=False)
        ax.set_title(title, fontsize=9)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if m[i, j] < 0.85 else "k")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    _save(fig, path, tight=False)


def plot_sts_layers(result: dict, path, title: str | None = None) -> None:
    """Spearman rho per layer: activation similarity (with bootstrap band) and the baselines."""
    import numpy as np

    def arr(v):
        return np.array([np.nan if x is None else x for x in v], dtype=float)

    rho = arr(result["per_layer_spearman"])
    x = np.arange(len(rho))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, rho, marker="o", ms=3, color="C0", label="parameter activation")
    if len(result.get("per_layer_ci") or []) == len(rho):
        ci = np.array([[np.nan if x is None else x for x in (c or (None, None))]
                       for c in result["per_layer_ci"]], dtype=float)
        ax.fill_between(x, ci[:, 0], ci[:, 1], color="C0", alpha=0.2)
    for k, (name, vals) in enumerate(result.get("baselines", {}).items()):
        ax.plot(x, arr(vals), marker=".", ms=3, color=f"C{k + 1}", label=f"{name} cosine")
        c = result.get("baselines_ci", {}).get(name)
        if c:
            c = np.array([[np.nan if v is None else v for v in row] for row in c])
            ax.fill_between(x, c[:, 0], c[:, 1], color=f"C{k + 1}", alpha=0.12)
    ax.axhline(0, color="gray", lw=0.8)
    _finish_layer_plot(fig, ax, path, "Spearman ρ with human score",
                       title or f"{result.get('dataset')}: {result.get('samples')} pairs")


def plot_allocation(allocations: dict[str, list[float]], path, title: str | None = None,
                    achieved: dict[str, list[float]] | None = None) -> None:
    """Layer-wise sparsity S_i per decoder layer, one line per allocator (and, dashed, the
    sparsity pruned models achieved)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in allocations.items():
        ax.plot(range(len(s)), s, marker="o", ms=3, label=name)
    for name, s in (achieved or {}).items():
        ax.plot(range(len(s)), s, ls="--", lw=1, label=name)
    _finish_layer_plot(fig, ax, path, "sparsity S_i", title or "Layer-wise sparsity per allocator")


def plot_allocation_panels(panels: dict[str, dict[str, list[float]]], path,
                           title: str | None = None) -> None:
    """Small multiples: one panel per target sparsity (title -> {allocator: S_i}), one colour per
    allocator in every panel, the legend outside the data and each panel's target as a line."""
    names = sorted({name for curves in panels.values() for name in curves})
    colour = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.6, 3.4),
                             sharey=True, squeeze=False)
    for ax, (label, curves) in zip(axes[0], panels.items()):
        for name, s in curves.items():
            ax.plot(range(len(s)), s, marker="o", ms=2.5, lw=1.2, color=colour[name], label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sparsity S_i")
    handles = [plt.Line2D([], [], color=colour[n], marker="o", ms=3, lw=1.2) for n in names]
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, tight=False)


def plot_calibration(spec: dict, path, title: str | None = None) -> None:
    """Validation 2: accuracy of each calibration set (rows) on each task (columns), minus the
    task's mean over calibration sets, in standard errors; the own-task cells are outlined."""
    import numpy as np

    calibs, tasks = spec["calibrations"], spec["tasks"]
    z = np.array([[spec["centred"][x][t] / spec["se"][t]
                   if t in spec["centred"][x] and spec["se"].get(t) else np.nan
                   for t in tasks] for x in calibs], dtype=float)
    lim = max(float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0, 1.0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(tasks), 1.0 + 0.5 * len(calibs)))
    im = ax.imshow(z, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, fontsize=8)
    ax.set_yticks(range(len(calibs)))
    ax.set_yticklabels(calibs, fontsize=8)
    ax.set_xlabel("evaluated task", fontsize=8)
    ax.set_ylabel("calibration set", fontsize=8)
    for i, x in enumerate(calibs):
        for j, t in enumerate(tasks):
            v = spec["acc"][x].get(t)
            if v is not None:
                dark = np.isfinite(z[i, j]) and abs(z[i, j]) > 0.6 * lim
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
            if x == t:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2))
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("vs the task's mean (standard errors)", fontsize=7)
    ax.set_title(title or f"{spec['metric']} by calibration set (own task outlined)", fontsize=9)
    _save(fig, path)
