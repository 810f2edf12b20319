"""Artifact writers: a result dict -> its JSON and figures in a run directory (no printing).

The commands print their summaries; the experiments and the demo call these writers directly,
so the files a run holds are the same whichever way it was made.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import write_json


def write_similarity(result: dict, out: str | Path) -> None:
    """RUN/similarity.json, similarity_boxes.png (at most four panels), similarity_median.png."""
    from .plots import plot_similarity_boxes, plot_similarity_medians

    out = Path(out)
    write_json(out / "similarity.json", result)
    comps = result["comparisons"]
    plot_similarity_boxes(comps[:4] if len(comps) > 4 else comps, out / "similarity_boxes.png")
    plot_similarity_medians(comps, out / "similarity_median.png")


def write_sts(result: dict, out: str | Path) -> None:
    """RUN/sts.json and sts_layers.png (rho per layer, with the baselines)."""
    from .plots import plot_sts_layers

    out = Path(out)
    write_json(out / "sts.json", result)
    plot_sts_layers(result, out / "sts_layers.png")


def write_relate(result: dict, json_path: str | Path | None = None,
                 plot_path: str | Path | None = None, band: str = "deep") -> None:
    """The relate result as JSON and the heatmap of one band (either may be None)."""
    from .plots import plot_relatedness

    if json_path:
        write_json(json_path, result)
    if plot_path:
        b = result["bands"][band]
        plot_relatedness(result["datasets"], b["matrix"], plot_path,
                         title=f"Activation-pattern similarity, layers {b['start']}-"
                               f"{b['end'] - 1} ({band})")
