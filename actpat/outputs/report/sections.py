"""The report's sections: one renderer per artifact kind, registered in ``REPORT_SECTIONS``.

``write_report(paths, out)`` walks the given run directories (and JSON files), recognises each
artifact by its files, and renders one section per kind:

========================  ===============================================  =====================
artifact                  recognised by                                    section
========================  ===============================================  =====================
profile                   ``profile.safetensors`` + ``summary.json``       activated weights per
                                                                           layer (Figure 1) and
                                                                           dataset relatedness
similarity                ``similarity.json`` (``kind: actpat-similarity``) box plots per layer
sts                       ``sts.json`` (``kind: actpat-sts``)              Spearman rho per layer
                                                                           with baselines
allocation                JSON with per-layer sparsities (``allocate``)    S_i per layer curves
pruning                   ``actpat_prune.json``                            pruning table
evaluation                JSON with perplexity / task accuracies (``eval``) evaluation table
figures                   any other ``*.png`` in a run directory           embedded as found
========================  ===============================================  =====================

What is absent is skipped; a file that cannot be read becomes a one-line note in the page rather
than an error. Every section lists its settings (model, data source, samples, sequence length,
gamma, seed, versions) as recorded by the command that wrote it. The page carries a strict
Content-Security-Policy (images from ``data:`` only) and a tiny inline script that records, after
load, how many images failed to decode (``data-broken-images``) and how many resource loads the
policy blocked (``data-blocked-loads``), which the rendering test reads back.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...registry import Registry
from ..plots import (comparison_name, plot_allocation, plot_band_heatmaps,
                     plot_similarity_panels, plot_sts_layers, png_bytes)
from .discover import EVAL_METRICS, EVAL_TASKS, Artifact, _eval_rows, _layer_sparsities

MAX_BOX_PANELS = 9  # similarity box plots drawn per run (all comparisons go in the tables)


# --------------------------------------------------------------------------- small helpers


def _num(x, digits: int = 4) -> str:
    """A number for a table: ints as is, floats to ``digits`` significant digits, n/a for None."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return html.escape(str(x))


def _esc(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _num(c)}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _model_name(model) -> str:
    """A short model label from an identity dict (spec + sha256 prefix) or a string."""
    if isinstance(model, dict):
        label = str(model.get("spec") or model.get("path") or "?")
        if model.get("sha256"):
            label += f" (sha256 {str(model['sha256'])[:12]})"
        return label
    return str(model) if model is not None else "?"


def _versions(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    return str(v) if v else "not recorded"


def _settings(pairs: list[tuple[str, object]]) -> str:
    """A definition list of a section's settings; entries whose value is None are left out."""
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in pairs
                    if v is not None and v != "")
    return f'<dl class="settings">{items}</dl>'


@dataclass
class Section:
    """One part of the page: a heading, its settings, and its body."""

    id: str
    title: str
    body: str
    sources: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- profiles


def profile_sections(arts: list[Artifact], gamma: float | None,
                     gamma_quantile: float | None) -> list[Section]:
    """Figure 1 (activated weights per layer) for all profiles; relatedness per model."""
    from ..plots import plot_layer_counts
    from ...activation.profiling import Profile, counts_one_gamma

    if not arts:
        return []
    loaded, rows, problems = [], [], []
    for a in arts:
        try:
            loaded.append((a, Profile.load(a.path)))
        except UserError as e:
            problems.append(str(e))
    # One gamma per model, as `actpat counts` does: absolute, or the quantile of its first run.
    all_counts = counts_one_gamma([p for _, p in loaded], [a.path.name for a, _ in loaded],
                                  gamma, gamma_quantile)
    for (a, prof), c in zip(loaded, all_counts):
        rows.append({"run": a.path.name, "dataset": prof.meta.get("dataset") or a.path.name,
                     "model": _model_name(prof.meta.get("model")), **c.to_json()})
    sections = []
    if loaded:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            png_path = Path(tmp) / "fig1.png"
            plot_layer_counts(rows, png_path)
            png = png_path.read_bytes()
        body = [_png_tag(png, "activated weights per layer")]
        n = max(len(r["layer_counts"]) for r in rows)
        header = ["layer"] + [f"{r['dataset']} (%)" for r in rows]
        table = [[i] + [(100.0 * r["layer_counts"][i] / r["scored_per_layer"][i])
                        if i < len(r["layer_counts"]) else None for r in rows] for i in range(n)]
        body.append("<details><summary>share of weights activated per layer (%)</summary>"
                    + _table(header, table) + "</details>")
        body.append(_table(
            ["run", "dataset", "model", "data source", "samples", "seq len", "objective", "seed",
             "gamma", "gamma rule", "activated (all layers)", "wall time (s)"],
            [[r["run"], r["dataset"], r["model"], p.meta.get("data_source"),
              p.meta.get("samples"), p.meta.get("seq_len"), p.meta.get("objective"),
              p.meta.get("seed"), r["gamma"], r["gamma_rule"], sum(r["layer_counts"]),
              p.meta.get("wall_time_s")] for r, (_, p) in zip(rows, loaded)]))
        versions = {_versions(p.meta.get("versions")) for _, p in loaded}
        body.append(_settings([("versions", "; ".join(sorted(versions)))]))
        body.extend(f'<p class="note">{_esc(x)}</p>' for x in problems)
        sections.append(Section("profiles", "Activated weights per layer (Figure 1)",
                                "\n".join(body), [str(a.path) for a, _ in loaded]))
        sections.extend(_relatedness_sections(loaded))
    elif problems:
        sections.append(Section("profiles", "Activated weights per layer (Figure 1)",
                                "".join(f'<p class="note">{_esc(x)}</p>' for x in problems)))
    return sections


def _relatedness_sections(loaded) -> list[Section]:
    """Dataset x dataset similarity of mean profiles (paper Figure 6), per model with >= 2 runs."""
    from ...analysis.similarity import dataset_similarity, relate_bands

    groups: dict[str, list] = {}
    for a, p in loaded:
        key = json.dumps([p.meta.get("model"), list(p.maps)[:1], len(p.maps)], sort_keys=True,
                         default=str)
        groups.setdefault(key, []).append((a, p))
    out = []
    for k, group in enumerate(g for g in groups.values() if len(g) >= 2):
        profiles = [p for _, p in group]
        names = _unique([str(p.meta.get("dataset") or a.path.name) for a, p in group])
        bands = relate_bands(profiles[0].num_layers)
        mat = dataset_similarity(profiles, names, bands)
        png = png_bytes(plot_band_heatmaps, names, {f"{b} layers [{s}, {e})": mat.band(b)
                                     for b, (s, e) in bands.items()})
        body = [_png_tag(png, "dataset relatedness heatmap")]
        deep = mat.band("deep")
        body.append("<p>Similarity of the datasets' mean activation maps, averaged over the deep "
                    f"layers [{bands['deep'][0]}, {bands['deep'][1]}):</p>")
        body.append(_table([""] + names, [[n] + [float(deep[i, j]) for j in range(len(names))]
                                          for i, n in enumerate(names)]))
        model = _model_name(profiles[0].meta.get("model"))
        body.append(_settings([("model", model), ("similarity", "cosine of |a| and |b| per "
                                                  "layer (docs/method.md section 2)")]))
        sid = "relatedness" if k == 0 else f"relatedness-{k}"
        out.append(Section(sid, "Dataset relatedness (mean profiles, Figure 6)", "\n".join(body),
                           [str(a.path) for a, _ in group]))
    return out


def relate_sections(arts: list[Artifact]) -> list[Section]:
    """Saved ``actpat relate --json`` results: a heatmap per band and the ranking."""
    out = []
    for a in arts:
        d = a.data
        names = d.get("datasets") or []
        bands = {k: v for k, v in (d.get("bands") or {}).items() if isinstance(v, dict)
                 and v.get("matrix")}
        if not names or not bands:
            continue
        png = png_bytes(plot_band_heatmaps, names, {f"{band} layers [{b.get('start')}, {b.get('end')})":
                                     b["matrix"] for band, b in bands.items()})
        body = [_png_tag(png, "dataset relatedness heatmap")]
        ref = d.get("reference")
        rows = [[band, ", ".join(f"{n} {_num(v, 3)}" for n, v in ranking)]
                for band, ranking in (d.get("ranking") or {}).items()]
        if rows:
            body.append(f"<p>Datasets closest to {_esc(ref)}, per band:</p>"
                        + _table(["band", "ranking"], rows))
        body.append(_settings([("runs", ", ".join(map(str, d.get("runs") or []))),
                               ("layers", d.get("num_layers"))]))
        sid = "relate" if not out else f"relate-{len(out)}"
        out.append(Section(sid, f"Dataset relatedness ({a.path.name})", "\n".join(body),
                           [str(a.path)]))
    return out


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def counts_sections(arts: list[Artifact]) -> list[Section]:
    """Saved ``actpat counts --json`` files (when not re-derived from their profiles)."""
    out = []
    for a in arts:
        rows = a.data
        n = max(len(r["layer_counts"]) for r in rows)
        header = ["layer"] + [str(r.get("dataset") or r.get("run")) for r in rows]
        table = [[i] + [r["layer_counts"][i] if i < len(r["layer_counts"]) else None
                        for r in rows] for i in range(n)]
        gammas = ", ".join(sorted({f"{r.get('gamma'):.3g} ({r.get('gamma_rule')})"
                                   for r in rows}))
        out.append(Section(f"counts-{len(out)}", f"Activated-weight counts ({a.path.name})",
                           _table(header, table) + _settings([("gamma", gammas)]),
                           [str(a.path)]))
    return out


# --------------------------------------------------------------------------- similarity


def similarity_sections(arts: list[Artifact]) -> list[Section]:
    """Within / cross-domain similarity: box plots per layer and a summary table."""
    out = []
    for a in arts:
        d = a.data
        comps = d.get("comparisons") or []
        if not comps:
            continue
        shown = comps[:MAX_BOX_PANELS]
        n = len(shown)
        body = [_png_tag(png_bytes(plot_similarity_panels, shown),
                         "similarity box plots per layer")]
        if len(comps) > n:
            body.append(f'<p class="note">Box plots of the first {n} of {len(comps)} '
                        "comparisons; the tables list all of them.</p>")
        layers = d.get("num_layers") or len(comps[0]["summary"]["median"])
        half = layers // 2
        rows = []
        for c in comps:
            med = [x for x in c["summary"]["median"]]
            rows.append([comparison_name(c), len(c.get("per_pair", [])),
                         _mean(med[1:half]), _mean(med[half:]), _mean(med)])
        body.append(_table(["comparison", "pairs", f"median sim, layers 1-{half - 1}",
                            f"median sim, layers {half}-{layers - 1}", "median sim, all"],
                           rows))
        per_layer = [[i] + [c["summary"]["median"][i] for c in comps] for i in range(layers)]
        body.append("<details><summary>median similarity per layer</summary>"
                    + _table(["layer"] + [comparison_name(c) for c in comps], per_layer)
                    + "</details>")
        sources = "; ".join(f"{k}: {v.get('source')}" for k, v in (d.get("datasets") or {}).items())
        body.append(_settings([
            ("model", _model_name(d.get("model"))), ("data source", sources),
            ("pairs", d.get("pairs")), ("seq len", d.get("seq_len")),
            ("objective", d.get("objective")), ("seed", d.get("seed")),
            ("time", _timing(d.get("timing"))), ("versions", _versions(d.get("versions")))]))
        out.append(Section(f"similarity-{len(out)}" if out else "similarity",
                           "Pattern similarity within and across domains ("
                           + (a.path.parent.name if a.path.name == "similarity.json"
                              else a.path.name) + ")",
                           "\n".join(body), [str(a.path)]))
    return out


def _mean(xs) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _timing(t) -> str | None:
    if not isinstance(t, dict):
        return None
    return ", ".join(f"{k} {_num(v)}" for k, v in t.items() if not isinstance(v, (dict, list)))


# --------------------------------------------------------------------------- sts


def sts_sections(arts: list[Artifact]) -> list[Section]:
    """Spearman rho of pattern similarity vs human scores, per layer, with baselines."""
    out = []
    for a in arts:
        d = a.data
        rho = d.get("per_layer_spearman")
        if not rho:
            continue
        body = [_png_tag(png_bytes(plot_sts_layers, d), "STS Spearman rho per layer")]
        bands = d.get("bands") or {}
        if bands:
            rows = [[name, f"[{b.get('start')}, {b.get('end')})", b.get("paper"), b.get("rho"),
                     b.get("p"), _ci(b.get("ci"))] for name, b in bands.items()]
            body.append("<p>Score of a pair = sum of its per-layer similarities over a band:</p>"
                        + _table(["band", "layers", "paper band", "Spearman ρ", "p",
                                  "95% CI"], rows))
        best = d.get("best") or {}
        if best:
            body.append(_table(["signal", "best layer", "ρ"],
                               [[k, v.get("layer"), v.get("rho")] for k, v in best.items()]))
        per_layer = [[i, rho[i], (d.get("per_layer_p") or [None] * len(rho))[i]]
                     + [v[i] if i < len(v) else None for v in (d.get("baselines") or {}).values()]
                     for i in range(len(rho))]
        body.append("<details><summary>ρ per layer</summary>"
                    + _table(["layer", "ρ activation", "p"] + list(d.get("baselines") or {}),
                             per_layer) + "</details>")
        body.append(_settings([
            ("model", _model_name(d.get("model"))), ("dataset", d.get("dataset")),
            ("split", d.get("split")), ("data source", d.get("source")),
            ("pairs", d.get("samples")), ("max tokens", d.get("max_tokens")),
            ("objective", d.get("objective")), ("seed", d.get("seed")),
            ("bootstrap", json.dumps(d.get("bootstrap")) if d.get("bootstrap") else None),
            ("time", _timing(d.get("timing"))), ("versions", _versions(d.get("versions")))]))
        out.append(Section(f"sts-{len(out)}" if out else "sts",
                           f"Semantic similarity: {d.get('dataset')} (STS)", "\n".join(body),
                           [str(a.path)]))
    return out


def _nan(xs) -> list[float]:
    return [float("nan") if x is None else float(x) for x in xs]


def _ci(c) -> str:
    if not c or len(c) != 2 or c[0] is None:
        return "n/a"
    return f"[{_num(c[0], 3)}, {_num(c[1], 3)}]"




def allocation_sections(arts: list[Artifact], pruned: list[Artifact] = ()) -> list[Section]:
    """S_i per layer for every allocation found (one figure, one table); pruned models' achieved
    per-layer sparsity as dashed lines."""
    curves = []
    for a in arts:
        s = _layer_sparsities(a.data)
        if s is None:
            continue
        d = a.data
        cfg = d.get("config") if isinstance(d.get("config"), dict) else d
        method = cfg.get("method") or d.get("method") or a.path.stem
        curves.append((a, str(method), cfg.get("sparsity", d.get("sparsity")), s, d))
    if not curves:
        return []
    dup = len({c[1] for c in curves}) < len(curves)
    lines = {f"{method} ({a.path.parent.name})" if dup else method: s
             for a, method, target, s, _ in curves}
    achieved = {f"achieved: pruned/{a.path.parent.name}": a.data["achieved_per_layer"]
                for a in pruned if isinstance(a.data.get("achieved_per_layer"), list)
                and a.data["achieved_per_layer"]}
    body = [_png_tag(png_bytes(plot_allocation, lines, title="Layer-wise sparsity allocation",
                               achieved=achieved), "allocation curves")]
    rows = []
    for a, method, target, s, d in curves:
        cfg = d.get("config") if isinstance(d.get("config"), dict) else d
        rows.append([method, target, _mean(s), min(s), max(s), cfg.get("alpha"), cfg.get("beta"),
                     _profile_label(d), str(a.path)])
    body.append(_table(["method", "target S", "mean S_i", "min S_i", "max S_i", "α", "β",
                        "profile / gamma", "file"], rows))
    n = max(len(c[3]) for c in curves)
    body.append("<details><summary>S_i per layer</summary>" + _table(
        ["layer"] + [c[1] for c in curves],
        [[i] + [c[3][i] if i < len(c[3]) else None for c in curves] for i in range(n)])
        + "</details>")
    return [Section("allocation", "Layer-wise sparsity allocation", "\n".join(body),
                    [str(c[0].path) for c in curves])]


def _profile_label(d: dict) -> str:
    parts = []
    for k in ("profile", "gamma", "gamma_rule", "seed"):
        v = d.get(k)
        if v is None and isinstance(d.get("counts"), dict):
            v = d["counts"].get(k)
        if v is not None:
            parts.append(f"{k} {v if not isinstance(v, float) else _num(v, 3)}")
    return ", ".join(parts) or "n/a"


# --------------------------------------------------------------------------- pruning, eval




def _eval_size(v: dict) -> str:
    if "windows" in v:
        return f"{v.get('windows')} windows × {v.get('seq_len')} tokens"
    if "n" in v:
        return f"n = {v.get('n')}"
    return ""


def _with_error(p: float, n) -> str | float:
    """An accuracy with its binomial standard error, ``0.340 ± 0.067``, when n is known."""
    if not isinstance(n, int) or n < 1:
        return p
    return f"{p:.3f} ± {(p * (1 - p) / n) ** 0.5:.3f}"


def eval_sections(arts: list[Artifact]) -> list[Section]:
    """One table, a row per evaluated model and a column per (task, metric), then the sizes."""
    columns: list[tuple[str, str]] = []
    rows, sizes = [], {}
    for a in arts:
        label = a.path.stem if a.path.parent.name == "eval" else \
            f"{a.path.parent.name}/{a.path.stem}"
        values = {}
        src = a.data.get("results") if isinstance(a.data.get("results"), dict) else a.data
        for task, m, v in _eval_rows(a.data):
            if (task, m) not in columns:
                columns.append((task, m))
            values[(task, m)] = _with_error(v, src[task].get("n")) if m.startswith("acc") else v
        if not values:
            continue
        rows.append((label, values))
        for task, v in src.items():
            if isinstance(v, dict) and task not in sizes:
                sizes[task] = (_eval_size(v), v.get("source"))
    if not rows:
        return []
    order = {t: i for i, t in enumerate(EVAL_TASKS)}
    columns.sort(key=lambda c: (order.get(c[0], 99), EVAL_METRICS.index(c[1])))
    body = _table(["model"] + [f"{t} {m}" for t, m in columns],
                  [[label] + [vals.get(c) for c in columns] for label, vals in rows])
    body += "<p>Sizes and data:</p>" + _table(
        ["task", "size", "source"], [[t, sz, src] for t, (sz, src) in sizes.items()])
    body += ('<p class="note">acc: argmax of summed log-likelihood per choice; acc_norm: '
             "normalised by the choice's length (lm-evaluation-harness); ± one standard error "
             "sqrt(p (1 − p) / n), n per task above: two models whose accuracies differ by less "
             "than about two standard errors are not told apart. Perplexity over "
             "non-overlapping windows (windows × tokens above).</p>")
    return [Section("evaluation", "Evaluation: perplexity and zero-shot accuracy", body,
                    [str(a.path) for a in arts])]


def prune_sections(arts: list[Artifact]) -> list[Section]:
    """What was pruned, how, and the sparsity reached."""
    rows = []
    for a in arts:
        d = a.data
        alloc = d.get("allocation")
        method = alloc.get("method") if isinstance(alloc, dict) else alloc
        calib = d.get("calibration")
        calib_label = (f"{calib.get('dataset')} [{calib.get('source')}] "
                       f"{calib.get('samples')}×{calib.get('seq_len')}"
                       if isinstance(calib, dict) else calib)
        target = d.get("target_sparsity", d.get("sparsity", _get(alloc, "sparsity")))
        rows.append([a.path.parent.name, _model_name(d.get("model")), d.get("pruner"),
                     d.get("pattern"), method, target,
                     d.get("achieved_sparsity", d.get("actual_sparsity")),
                     calib_label, d.get("seed"),
                     d.get("total_seconds", d.get("prune_seconds"))])
    if not rows:
        return []
    body = _table(["pruned model", "model", "pruner", "pattern", "allocation", "target S",
                   "achieved", "calibration", "seed", "time (s)"], rows)
    versions = {_versions(a.data.get("versions")) for a in arts}
    body += _settings([("versions", "; ".join(sorted(versions)))])
    return [Section("pruning", "Pruning", body, [str(a.path) for a in arts])]


def experiment_sections(arts: list[Artifact]) -> list[Section]:
    """Configurations of a reproduction (pruner, allocation, S, calibration, seed -> results),
    one table per experiment directory."""
    groups: dict[str, list[Artifact]] = {}
    for a in arts:
        root = a.group or (a.path.parent.parent.name if a.path.parent.name == "configs"
                           else a.path.parent.name)
        groups.setdefault(root, []).append(a)
    out = []
    for root, group in groups.items():
        columns: list[tuple[str, str]] = []
        rows = []
        for a in sorted(group, key=lambda x: str(x.data.get("name") or x.path.name)):
            d = a.data
            values = {}
            for task, m, v in _eval_rows(d["eval"]):
                if (task, m) not in columns:
                    columns.append((task, m))
                values[(task, m)] = v
            c = d["config"]
            rows.append(([d.get("name", a.path.stem), c.get("pruner") or "dense",
                          c.get("allocation") if c.get("pruner") else "",
                          c.get("sparsity"), c.get("pattern") if c.get("pruner") else "",
                          c.get("calibration") if c.get("pruner") else "", c.get("seed"),
                          _get(d.get("prune"), "achieved_sparsity")], values))
        order = {t: i for i, t in enumerate(EVAL_TASKS)}
        columns.sort(key=lambda c: (order.get(c[0], 99), EVAL_METRICS.index(c[1])))
        body = _table(["configuration", "pruner", "allocation", "S", "pattern", "calibration",
                       "seed", "achieved"] + [f"{t} {m}" for t, m in columns],
                      [r + [v.get(c) for c in columns] for r, v in rows])
        st = group[0].data.get("settings") or {}
        body += _settings([
            ("model", st.get("model")), ("data dir", st.get("data_dir")),
            ("perplexity", f"{st.get('windows')} windows × {st.get('seq_len')} tokens"
             if st.get("windows") else None),
            ("zero-shot limit", st.get("zero_shot_limit")),
            ("calibration", f"{st.get('calib_samples')} × {st.get('calib_seq_len')} tokens"
             if st.get("calib_samples") else None),
            ("gamma", f"quantile {st.get('gamma_quantile')}" if st.get("gamma_quantile")
             else None),
            ("configurations", len(group)),
            ("versions", _versions(group[0].data.get("versions")))])
        sid = "experiments" if not out else f"experiments-{len(out)}"
        out.append(Section(sid, f"Pruning experiments ({root})", body,
                           sorted({str(a.path) for a in group})))
    return out


def calibration_sections(arts: list[Artifact]) -> list[Section]:
    """Validation 2 (``OUT/calibration.json``): accuracy per calibration set and task, the
    own-set check and, when computed, the correlation with dataset relatedness."""
    out = []
    for a in arts:
        parts = []
        for metric, spec in a.data.items():
            if not isinstance(spec, dict) or "own" not in spec:
                continue  # "kind"
            tasks = spec["tasks"]
            rows = [[x] + [_Raw(f"<b>{_num(spec['acc'][x].get(t))}</b>") if x == t
                           else spec["acc"][x].get(t) for t in tasks]
                    for x in spec["calibrations"]]
            rows.append(["dense"] + [spec["dense"].get(t) for t in tasks])
            rows.append(["standard error"] + [spec["se"].get(t) for t in tasks])
            parts.append(f"<h3>{_esc(metric)} (rows: calibration set; bold: its own task)</h3>"
                         + _table(["calibration"] + tasks, rows))
            own = spec["own"]
            parts.append(f"<p>The own calibration set gives the strictly best {_esc(metric)} "
                         f"on {spec['own_best']} of {len(own)} tasks (by more than one standard "
                         f"error on {spec['own_best_by_1se']}) and ties for best on "
                         f"{spec['own_tied_best']}.</p>" + _table(
                             ["task", "own-set acc", "rank", "best other", "margin (SE)"],
                             [[t, v["acc"], f"{v['rank']} of {v['of']}", v["best_other"],
                               v["margin_se"]] for t, v in own.items()]))
            rel = spec.get("relatedness") or {}
            if rel:
                parts.append("<p>Spearman correlation between relatedness r(calibration, task) "
                             "and accuracy minus the task's mean:</p>" + _table(
                                 ["band", "rho (all pairs)", "rho (without own set)", "pairs"],
                                 [[b, v["spearman"], v["spearman_without_own"], v["n_pairs"]]
                                  for b, v in rel.items()]))
        sid = "calibration" if not out else f"calibration-{len(out)}"
        where = a.path.parent.name if a.path.name == "calibration.json" else a.path.stem
        out.append(Section(sid, f"Calibration specificity ({where})",
                           "".join(parts), [str(a.path)]))
    return out


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else None


def figure_sections(arts: list[Artifact]) -> list[Section]:
    """PNG figures found in run directories, embedded as they are."""
    if not arts:
        return []
    body = []
    for a in arts:
        try:
            png = a.path.read_bytes()
        except OSError:
            continue
        if not png.startswith(b"\x89PNG"):
            continue
        body.append(f"<h3>{_esc(a.path.parent.name)}/{_esc(a.path.name)}</h3>"
                    + _png_tag(png, a.path.name))
    if not body:
        return []
    body = [f"<details><summary>{len(body)} figures written by the commands</summary>"] + body \
        + ["</details>"]
    return [Section("figures", "Figures from the run directories", "\n".join(body),
                    [str(a.path) for a in arts])]


# --------------------------------------------------------------------------- smoke run


def smoke_sections(arts: list[Artifact]) -> list[Section]:
    """The demo's offline smoke run: pruned vs dense perplexity on packaged held-out text."""
    out = []
    for a in arts:
        d = a.data
        rows = [[r["model"], _num(r.get("sparsity"), 2), _num(r["ppl"]),
                 f"{r['windows']} x {r['seq_len']} tokens"] for r in d["rows"]]
        skipped = "; ".join(f"{k}: {v}" for k, v in (d.get("skipped") or {}).items())
        body = (f'<p class="note"><b>{_esc(d["label"])}</b>. Perplexity on {_esc(d["corpus"])}; '
                f"calibration: {_esc(d['calibration'])}. Skipped: {_esc(skipped)}.</p>"
                + _table(["model", "sparsity", "perplexity", "windows x length"], rows))
        out.append(Section("smoke", "Smoke run on packaged texts (not a benchmark)", body,
                           [str(a.path)]))
    return out


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ReportSection:
    """``render(by_kind, sections_so_far, options) -> [Section]``; ``by_kind`` maps an artifact
    kind to its artifacts, ``options`` holds ``gamma`` and ``gamma_quantile``."""

    render: Callable[[dict, list, dict], list[Section]]


REPORT_SECTIONS: Registry[ReportSection] = Registry("report section")


def register_section(kind: str, render: Callable[[list[Artifact]], list[Section]]) -> None:
    """One section renderer for the artifacts of ``kind`` (a ``"kind": "actpat-<kind>"`` JSON)."""
    REPORT_SECTIONS.add(kind, ReportSection(lambda by, done, opts: render(by.get(kind, []))))


REPORT_SECTIONS.add("profile", ReportSection(lambda by, done, opts: profile_sections(
    by["profile"], opts["gamma"], opts["gamma_quantile"])))
REPORT_SECTIONS.add("counts", ReportSection(  # counts files stand in when no profile is there
    lambda by, done, opts: [] if by["profile"] else counts_sections(by["counts"])))
REPORT_SECTIONS.add("relate", ReportSection(  # the profiles' own relatedness comes first
    lambda by, done, opts: [] if any(x.id.startswith("relatedness") for x in done)
    else relate_sections(by["relate"])))
register_section("similarity", similarity_sections)
register_section("sts", sts_sections)
REPORT_SECTIONS.add("allocation", ReportSection(
    lambda by, done, opts: allocation_sections(by["allocation"], by["prune"])))
register_section("prune", prune_sections)
register_section("eval", eval_sections)
register_section("smoke", smoke_sections)
register_section("experiment", experiment_sections)
register_section("calibration", calibration_sections)
register_section("figure", figure_sections)
