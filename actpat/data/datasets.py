"""Datasets: a registry of loaders + prompt builders, and seeded sampling of token sequences.

Each registered dataset reads ``<data-dir>/<name>/<split>.jsonl`` (or ``.txt``) when it exists,
else the Hugging Face hub. Three kinds:

* ``prompts``: one prompt per record, in lm-evaluation-harness's zero-shot format (QA sets);
* ``windows``: a corpus cut into fixed-length token windows (c4, wikitext2);
* ``pairs``: sentence pairs with a human similarity score (stsb, sick); profiled as single
  sentences, compared pairwise by ``actpat.similarity``.

Any local ``.jsonl`` (field ``--text-field``, default ``text``, or a ``--template``) or ``.txt``
file (one text per non-empty line) is a dataset too; its texts are used in file order.
Adding a dataset is one ``register_dataset(DatasetSpec(...))`` call.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..hub import OFFLINE_FIX, endpoint, prepare_hub
from ..registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "prompts" | "windows" | "pairs"
    default_split: str
    hub: tuple[str, str | None] | None = None  # (repository, config) for datasets.load_dataset
    hub_kwargs: dict = field(default_factory=dict)
    prompt: Callable[[dict], str] | None = None  # record -> text (prompts, pairs)
    pair_fields: tuple[str, str, str] | None = None  # (sentence A, sentence B, score)
    description: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.add(spec.name, spec)


# --------------------------------------------------------------------------- prompt builders
# lm-evaluation-harness zero-shot formats (the query part, without the answer).


def hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (WikiHow bracket artefacts), shared with the task."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mmlu_prompt(r: dict) -> str:
    subject = r.get("subject", "").replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    options = "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", r["choices"]))
    return f"{head}{r['question'].strip()}\n{options}Answer:"


PROMPTS: dict[str, Callable[[dict], str]] = {
    "boolq": lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
    "piqa": lambda r: f"Question: {r['goal']}\nAnswer:",
    "siqa": lambda r: f"Q: {r['context']} {r['question']}\nA:",
    "hellaswag": lambda r: hellaswag_clean(f"{r['activity_label']}: {r['ctx']}"),
    "mmlu": _mmlu_prompt,
    "gsm8k": lambda r: f"Question: {r['question']}\nAnswer:",
    "humaneval": lambda r: r["prompt"],
}

# The gold answer of each multiple-choice record: its choices and the index of the right one
# (the fields of the local files, PROVENANCE.md). The zero-shot tasks score these choices
# against this target, and QA calibration appends the gold choice after the prompt, so the
# calibration text and the evaluated continuation are the same string.
CHOICES: dict[str, Callable[[dict], list[str]]] = {
    "boolq": lambda r: ["no", "yes"],
    "piqa": lambda r: [r["sol1"], r["sol2"]],
    "siqa": lambda r: [r["answerA"], r["answerB"], r["answerC"]],
    "hellaswag": lambda r: [hellaswag_clean(e) for e in r["endings"]],
    "mmlu": lambda r: ["A", "B", "C", "D"],
}
GOLD: dict[str, Callable[[dict], int]] = {
    "boolq": lambda r: int(str(r["answer"]).lower() in ("true", "1")),
    "piqa": lambda r: int(r["label"]),
    "siqa": lambda r: int(r["label"]) - 1,
    "hellaswag": lambda r: int(r["label"]),
    "mmlu": lambda r: int(r["answer"]),
}
# free-text answers of the generation datasets (no choices)
_FREE_ANSWERS: dict[str, Callable[[dict], str]] = {
    "gsm8k": lambda r: " " + r["answer"],
    "humaneval": lambda r: r["canonical_solution"],
}


def gold_answer(dataset: str, row: dict) -> str:
    """The gold answer's text as lm-eval continues the prompt (" " + the gold choice), the
    free-text answer of a generation dataset, or "" when the dataset or the row has none."""
    try:
        if dataset in GOLD:
            return " " + CHOICES[dataset](row)[GOLD[dataset](row)]
        if dataset in _FREE_ANSWERS:
            return _FREE_ANSWERS[dataset](row)
    except (KeyError, ValueError, IndexError, TypeError):
        return ""
    return ""


for _name, _split, _hub, _kw, _desc in [
    ("boolq", "validation", ("google/boolq", None), {}, "yes/no questions on a Wikipedia passage"),
    ("piqa", "validation", ("ybisk/piqa", None), {}, "physical commonsense"),
    ("siqa", "validation", ("allenai/social_i_qa", None), {}, "social commonsense"),
    ("hellaswag", "validation", ("Rowan/hellaswag", None), {}, "sentence completion"),
    ("mmlu", "test", ("cais/mmlu", "all"), {}, "57-subject multiple choice"),
    ("gsm8k", "test", ("openai/gsm8k", "main"), {}, "grade-school arithmetic"),
    ("humaneval", "test", ("openai/openai_humaneval", None), {}, "Python functions"),
]:
    register_dataset(DatasetSpec(_name, "prompts", _split, _hub, _kw, PROMPTS[_name],
                                 description=_desc))

register_dataset(DatasetSpec(
    "c4", "windows", "validation", ("allenai/c4", None),
    {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"}},
    description="web text (C4 en)",
))
register_dataset(DatasetSpec(
    "wikitext2", "windows", "test", ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    description="Wikipedia articles (WikiText-2 raw)",
))
register_dataset(DatasetSpec(
    "stsb", "pairs", "validation", ("mteb/stsbenchmark-sts", None),
    prompt=lambda r: r["sentence1"], pair_fields=("sentence1", "sentence2", "score"),
    description="STS Benchmark sentence pairs, score 0-5",
))
register_dataset(DatasetSpec(
    "sick", "pairs", "test", ("RobZamp/sick", None),
    prompt=lambda r: r["sentence_A"], pair_fields=("sentence_A", "sentence_B", "relatedness_score"),
    description="SICK sentence pairs, relatedness 1-5",
))

PROBE_DOMAINS = ("prose", "code", "questions", "arithmetic")
for _domain in PROBE_DOMAINS:
    register_dataset(DatasetSpec(
        f"probe-{_domain}", "prompts", "all", None, prompt=lambda r: r["text"],
        description=f"built-in probe texts ({_domain}), shipped for offline use",
    ))


# --------------------------------------------------------------------------- loading


def default_data_dir() -> str | None:
    return os.environ.get("ACTPAT_DATA_DIR") or None


@dataclass
class Records:
    rows: list[dict]
    source: str  # "local:<path>", "hub:<repo>[/<config>]" or "package:<file>"


def is_path(dataset: str) -> bool:
    return dataset.endswith((".jsonl", ".txt", ".json")) or os.sep in dataset


def load_records(dataset: str, split: str | None = None, data_dir: str | None = None) -> Records:
    """Rows of a registered dataset (local dir first, then the hub) or of a local file."""
    if is_path(dataset):
        return Records(_read_file(Path(dataset)), f"local:{dataset}")
    spec = get_spec(dataset)
    split = split or spec.default_split
    if dataset.startswith("probe-"):
        from importlib.resources import files

        path = files("actpat") / "probes" / f"{dataset.removeprefix('probe-')}.txt"
        return Records(_read_txt_lines(path.read_text(encoding="utf-8")), f"package:{path.name}")
    data_dir = data_dir if data_dir is not None else default_data_dir()
    if data_dir:
        for ext in (".jsonl", ".txt"):
            path = Path(data_dir) / dataset / f"{split}{ext}"
            if path.exists():
                rows = _read_file(path) if ext == ".jsonl" else _read_wikitext_rows(path)
                return Records(rows, f"local:{path}")
    return _load_hub(spec, split, data_dir)


def require_records(dataset: str, split: str | None = None, data_dir: str | None = None) -> None:
    """Fail now, before a model is loaded, when a dataset can be read from nowhere.

    Local files are small and read again later; hub datasets come from the datasets cache the
    second time."""
    load_records(dataset, split, data_dir)


def _load_hub(spec: DatasetSpec, split: str, data_dir: str | None) -> Records:
    where = f"{data_dir}/{spec.name}/{split}.jsonl" if data_dir else "no --data-dir given"
    if spec.hub is None:
        raise UserError(f"dataset '{spec.name}' has no split '{split}' ({where})")
    repo, config = spec.hub
    reachable = prepare_hub()  # unreachable: the datasets cache only, no retries
    try:
        import datasets

        kwargs = dict(spec.hub_kwargs)
        ds = datasets.load_dataset(repo, config, split=split, **kwargs)
    except Exception as e:  # network, missing split, missing repo: one line for the user
        if not reachable:
            raise UserError(f"dataset '{spec.name}' split '{split}': no local copy ({where}), "
                            f"not in the datasets cache, and the hub ({endpoint()}) cannot be "
                            f"reached; point --data-dir / ACTPAT_DATA_DIR at a folder with "
                            f"{spec.name}/{split}.jsonl, or {OFFLINE_FIX}") from None
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"dataset '{spec.name}' split '{split}': no local copy ({where}) and the hub "
            f"failed ({reason}); point --data-dir / ACTPAT_DATA_DIR at a folder with "
            f"{spec.name}/{split}.jsonl"
        ) from None
    rows = [dict(r) for r in ds]
    if spec.name == "wikitext2":  # hub rows already are the raw rows
        rows = [{"text": r["text"]} for r in rows]
    return Records(rows, f"hub:{repo}" + (f"/{config}" if config else ""))


def _read_file(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"data file not found: {path}; check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        rows = _read_txt_lines(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not valid JSON; each line must be one object") \
                    from None
    if not rows:
        raise UserError(f"data file {path} is empty; give a file with at least one text")
    return rows


def _read_txt_lines(text: str) -> list[dict]:
    return [{"text": line.strip()} for line in text.splitlines() if line.strip()]


def _read_wikitext_rows(path: Path) -> list[dict]:
    """WikiText raw layout: each line + "\\n" is a row, a blank " " line is the empty row."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rows.append({"text": "" if line.strip() == "" else line + "\n"})
    return rows


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset '{name}': use one of {', '.join(DATASETS)} "
            "or a path to a .jsonl/.txt file"
        )
    return DATASETS[name]


def corpus_text(dataset: str, split: str | None = None, data_dir: str | None = None) -> tuple[str, str]:
    """A windows corpus as one string (rows joined with "\\n\\n" for wikitext2, " " for c4)."""
    records = load_records(dataset, split, data_dir)
    sep = "\n\n" if dataset == "wikitext2" else " "
    return sep.join(r["text"] for r in records.rows), records.source


def record_texts(dataset: str, records: Records, text_field: str = "text",
                 template: str | None = None) -> list[str]:
    """One text per record: the dataset's prompt builder, a template, or a field."""
    if template is not None:
        try:
            return [template.format(**r) for r in records.rows]
        except KeyError as e:
            raise UserError(f"--template names field {e} that the records lack") from None
    if not is_path(dataset) and get_spec(dataset).prompt is not None:
        return [get_spec(dataset).prompt(r) for r in records.rows]
    if text_field not in records.rows[0]:
        fields = ", ".join(records.rows[0])
        raise UserError(f"records have no field '{text_field}' (they have: {fields}); "
                        "pass --text-field or --template")
    return [str(r[text_field]) for r in records.rows]


# --------------------------------------------------------------------------- sampling


@dataclass
class Samples:
    """Token sequences ready to score, with where they came from."""

    sequences: list[list[int]]
    indices: list[int]  # record index (prompts) or token offset (windows) of each sample
    source: str
    dataset: str
    split: str | None
    window_start: str | None = None  # windows: "bos" or "stream" (see ``window_bos``); texts: None


def window_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS in front of every text (Gemma, Llama-2), else None.

    A model trained that way has never seen a text start without BOS, so every window cut from
    a token stream (perplexity, calibration, corpus profiles) begins with it and holds
    ``seq_len - 1`` stream tokens, all of them predicted. Tokenizers that add no BOS (SmolLM2,
    Qwen2, GPT-2) keep plain windows of ``seq_len`` stream tokens, the Wanda / SparseGPT recipe,
    so published perplexities stay comparable.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def window_start(bos: int | None) -> str:
    """What the outputs record about the windows: ``"bos"`` or ``"stream"``."""
    return "stream" if bos is None else "bos"


def sample_sequences(
    tokenizer,
    dataset: str,
    n: int,
    seq_len: int = 256,
    seed: int = 0,
    split: str | None = None,
    data_dir: str | None = None,
    text_field: str = "text",
    template: str | None = None,
) -> Samples:
    """Seeded sample of ``n`` token sequences of at most ``seq_len`` tokens.

    Registered prompt datasets: ``n`` records drawn with ``random.Random(seed)``; longer prompts
    keep their first ``seq_len`` tokens. Windows corpora: ``n`` windows of exactly ``seq_len``
    tokens at seeded offsets (c4: one window inside each of ``n`` documents long enough, the Wanda
    recipe; wikitext2: in the joined text). Local files: the first ``n`` texts, in file order.
    """
    if n <= 0:
        raise UserError(f"--samples must be at least 1 (got {n})")
    if seq_len <= 1:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    rng = random.Random(seed)
    spec = None if is_path(dataset) else get_spec(dataset)
    split = None if spec is None else (split or spec.default_split)
    if spec is not None and spec.kind == "windows":
        return _sample_windows(tokenizer, dataset, n, seq_len, rng, split, data_dir)
    records = load_records(dataset, split, data_dir)
    texts = record_texts(dataset, records, text_field, template)
    if n > len(texts):
        raise UserError(f"--samples {n} is more than the {len(texts)} texts of '{dataset}'; "
                        f"use --samples {len(texts)} or fewer")
    order = list(range(n)) if spec is None or dataset.startswith("probe-") else \
        rng.sample(range(len(texts)), n)
    seqs = [_encode(tokenizer, texts[i])[:seq_len] for i in order]
    empty = [i for i, s in zip(order, seqs) if not s]
    if empty:
        raise UserError(f"record {empty[0]} of '{dataset}' tokenizes to nothing; remove it")
    return Samples(seqs, order, records.source, dataset, split)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_texts(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Each text as a sample (as ``sample_sequences`` encodes a prompt): its first ``seq_len``
    tokens; a text that tokenizes to nothing is refused."""
    seqs = [_encode(tokenizer, t)[:seq_len] for t in texts]
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise UserError(f"text {empty[0]} tokenizes to nothing; remove it")
    return seqs


def _sample_windows(tokenizer, dataset, n, seq_len, rng, split, data_dir) -> Samples:
    records = load_records(dataset, split, data_dir)
    bos = window_bos(tokenizer)
    body = seq_len if bos is None else seq_len - 1  # stream tokens per window
    head = [] if bos is None else [bos]

    def encode(text: str) -> list[int]:  # a BOS tokenizer's own BOS would land mid-window
        return _encode(tokenizer, text) if bos is None else \
            tokenizer(text, add_special_tokens=False)["input_ids"]

    if dataset == "c4":
        order = list(range(len(records.rows)))
        rng.shuffle(order)
        seqs, idx = [], []
        for i in order:
            ids = encode(records.rows[i]["text"])
            if len(ids) > body:
                start = rng.randint(0, len(ids) - body - 1)
                seqs.append(head + ids[start:start + body])
                idx.append(i)
                if len(seqs) == n:
                    return Samples(seqs, idx, records.source, dataset, split, window_start(bos))
        raise UserError(f"only {len(seqs)} documents of c4/{split} have more than {seq_len} "
                        f"tokens; lower --samples or --seq-len")
    text = "\n\n".join(r["text"] for r in records.rows)
    ids = encode(text)
    if len(ids) < body * n:
        raise UserError(f"{dataset}/{split} has {len(ids)} tokens, fewer than {n} windows of "
                        f"{seq_len}; lower --samples or --seq-len")
    starts = [rng.randint(0, len(ids) - body - 1) for _ in range(n)]
    return Samples([head + ids[s:s + body] for s in starts], starts, records.source, dataset,
                   split, window_start(bos))
