"""Finding the artifacts of a report: walk run directories, recognise each result by its files,
its ``kind`` field or its shape (an unreadable file becomes a note, never an error)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError

NOT_RESULTS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "model.safetensors.index.json", "summary.json",
               "added_tokens.json", "vocab.json", "actpat_source.json", "chat_template.json"}
SKIP_DIRS = {"checkpoint", ".git", "__pycache__"}
MAX_DEPTH = 4


@dataclass
class Artifact:
    """One result found on disk: its kind, where it is, and its parsed content."""

    kind: str  # profile | similarity | sts | allocation | prune | eval | counts | relate |
    #            calibration | figure
    path: Path
    data: object = None
    group: str | None = None  # experiments: the table it belongs to


def find_artifacts(paths: Iterable[str | Path],
                   kinds: Iterable[str] = ()) -> tuple[list[Artifact], list[str]]:
    """All recognisable artifacts under ``paths`` (directories or files), and notes on skips."""
    found: list[Artifact] = []
    notes: list[str] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"{p} does not exist; give run directories or result JSON files")
        if p.is_file():
            _classify_file(p, found, notes, seen, tuple(kinds))
        else:
            _walk(p, 0, found, notes, seen, tuple(kinds))
    return found, notes


def _walk(d: Path, depth: int, found, notes, seen, kinds=()) -> None:
    if (d / "profile.safetensors").exists() and (d / "summary.json").exists():
        if d.resolve() not in seen:
            seen.add(d.resolve())
            found.append(Artifact("profile", d))
    for f in sorted(d.iterdir()):
        if f.is_file():
            _classify_file(f, found, notes, seen, kinds)
        elif f.is_dir() and f.name not in SKIP_DIRS and depth < MAX_DEPTH:
            _walk(f, depth + 1, found, notes, seen, kinds)


def _classify_file(f: Path, found, notes, seen, kinds=()) -> None:
    key = f.resolve()
    if key in seen:
        return
    if f.suffix == ".png":
        seen.add(key)
        found.append(Artifact("figure", f))
        return
    if f.suffix != ".json" or f.name in NOT_RESULTS or f.name.endswith(".tmp"):
        return
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{f}: not readable JSON ({str(e)[:80]}); skipped")
        return
    kind = classify_json(f.name, data, kinds)
    if kind == "experiment-list":  # a results file holding many configurations
        seen.add(key)
        found.extend(Artifact("experiment", f, item, group=f.name) for item in data)
    elif kind:
        seen.add(key)
        found.append(Artifact(kind, f, data))


def classify_json(name: str, data, kinds: Iterable[str] = ()) -> str | None:
    """The artifact kind of a result JSON, by its ``kind`` field, file name or shape.

    ``kinds``: further kinds that a ``"kind": "actpat-<kind>"`` field may name (the report
    sections registered beyond the built-in ones)."""
    if isinstance(data, list):
        if data and isinstance(data[0], dict) and "layer_counts" in data[0]:
            return "counts"
        if data and all(isinstance(x, dict) and isinstance(x.get("config"), dict)
                        and isinstance(x.get("eval"), dict) for x in data):
            return "experiment-list"
        return None
    if not isinstance(data, dict):
        return None
    kind = str(data.get("kind", ""))
    for k in ("similarity", "sts", "allocation", "prune", "eval", "relate", "counts",
              "calibration", *kinds):
        if kind in (f"actpat-{k}", k):
            return k
    if kind in ("actpat-pruning", "pruning"):
        return "prune"
    if kind in ("actpat-evaluation", "evaluation"):
        return "eval"
    if name == "actpat_prune.json":
        return "prune"
    if isinstance(data.get("config"), dict) and isinstance(data.get("eval"), dict):
        return "experiment"  # one configuration of `actpat reproduce table1|calibration`
    if name in ("similarity.json", "sts.json"):
        return name.removesuffix(".json")
    if _layer_sparsities(data) is not None:
        return "allocation"
    if _eval_rows(data):
        return "eval"
    return None


def _layer_sparsities(d) -> list[float] | None:
    """The per-layer sparsities of an allocation result, whatever the key it uses."""
    if not isinstance(d, dict):
        return None
    for key in ("layer_sparsity", "layer_sparsities", "sparsities", "S_i", "s_i",
                "per_layer", "allocation"):
        v = d.get(key)
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            return [float(x) for x in v]
        if isinstance(v, dict):
            inner = _layer_sparsities(v)
            if inner is not None:
                return inner
    return None


EVAL_METRICS = ("ppl", "perplexity", "acc", "acc_norm")
EVAL_TASKS = ("wikitext2", "c4", "boolq", "piqa", "siqa", "hellaswag", "mmlu")


def _eval_rows(d) -> list[tuple[str, str, float]]:
    """(task, metric, value) rows of an evaluation result ``{task: {metric: value}}``."""
    rows = []
    if not isinstance(d, dict):
        return rows
    src = d.get("results") if isinstance(d.get("results"), dict) else d
    for task, v in src.items():
        if not isinstance(v, dict):
            continue
        for m in EVAL_METRICS:
            x = v.get(m)
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                rows.append((task, m, float(x)))
    return rows
