"""Figures (matplotlib, Agg backend): one function per figure, each writing a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_counts(results: list[dict], path, title: str | None = None) -> None:
    """Figure 1: activated weights per layer, one line per run (as a share of the layer)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        share = [c / s for c, s in zip(r["layer_counts"], r["scored_per_layer"])]
        ax.plot(range(len(share)), share, marker="o", ms=3, label=str(r.get("dataset") or r["run"]))
    gammas = {r["gamma_rule"] for r in results}
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of weights activated (A > γ)")
    ax.set_title(title or f"Activated weights per layer (γ: {', '.join(sorted(gammas))})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)
