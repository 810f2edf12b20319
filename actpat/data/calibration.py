"""Calibration sequences for pruning: equal-length token windows from a corpus or a QA set.

* Corpora (``c4``, ``wikitext2``, any windows dataset): ``actpat.data.sample_sequences`` (c4:
  one seeded window per document, the Wanda recipe). ``exclude_first`` does not apply.
* QA / prompt datasets (boolq, piqa, siqa, hellaswag, mmlu, ...; the paper's validation 2):
  the records after the first ``exclude_first`` rows (those rows are the ones ``actpat eval``
  scores, so calibration never sees an evaluated item) are shuffled with ``seed``; each
  becomes its lm-eval prompt followed by its gold answer (``data.datasets.gold_answer``: the
  same choice the zero-shot task scores as correct), the
  texts are joined with blank lines into one token stream, and the stream is cut into ``n``
  consecutive windows of ``seq_len`` tokens (BOS + ``seq_len - 1`` stream tokens when the
  tokenizer adds BOS, ``actpat.data.window_bos``).
"""

from __future__ import annotations

import random

from .datasets import (Samples, get_spec, gold_answer, is_path, load_records, record_texts,
                       sample_sequences, window_bos, window_start)
from ..errors import UserError

DEFAULT_EXCLUDE_FIRST = 200


def calibration_sequences(tokenizer, dataset: str, n: int, seq_len: int, seed: int = 0,
                          split: str | None = None, data_dir: str | None = None,
                          exclude_first: int = DEFAULT_EXCLUDE_FIRST) -> Samples:
    """``n`` windows of exactly ``seq_len`` tokens for calibration (see the module doc).

    ``Samples.indices``: the token offsets of the windows in the stream (prompt datasets) or
    the documents / offsets ``sample_sequences`` reports (corpora).
    """
    if n <= 0:
        raise UserError(f"--calibration-samples must be at least 1 (got {n})")
    if seq_len <= 1:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    spec = None if is_path(dataset) else get_spec(dataset)
    if spec is not None and spec.kind == "windows":
        return sample_sequences(tokenizer, dataset, n, seq_len, seed, split, data_dir)
    if exclude_first < 0:
        raise UserError(f"exclude_first must be >= 0 (got {exclude_first})")
    split = None if spec is None else (split or spec.default_split)
    records = load_records(dataset, split, data_dir)
    texts = record_texts(dataset, records)
    pool = list(range(exclude_first, len(texts)))
    if not pool:
        raise UserError(f"'{dataset}' has {len(texts)} records, all among the first "
                        f"{exclude_first} kept for evaluation; lower exclude_first")
    random.Random(seed).shuffle(pool)
    body = window_body(tokenizer, seq_len)
    stream: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for i in pool:
        stream += tokenizer(texts[i] + gold_answer(dataset, records.rows[i]),
                            add_special_tokens=False)["input_ids"] + sep
        if len(stream) >= n * body:
            break
    if len(stream) < n * body:
        raise UserError(f"the {len(pool)} calibration records of '{dataset}' give "
                        f"{len(stream)} tokens, fewer than {n} x {seq_len}; lower "
                        "--calibration-samples or --seq-len")
    windows, starts = stream_windows(tokenizer, stream, seq_len, n)
    return Samples(windows, starts,
                   f"{records.source} (rows >= {exclude_first}, shuffled, seed {seed})",
                   dataset, split, window_start(window_bos(tokenizer)))


def window_body(tokenizer, seq_len: int) -> int:
    """Stream tokens per window: ``seq_len``, or ``seq_len - 1`` behind a BOS (``window_bos``)."""
    return seq_len if window_bos(tokenizer) is None else seq_len - 1


def stream_windows(tokenizer, stream: list[int], seq_len: int,
                   n: int | None = None) -> tuple[list[list[int]], list[int]]:
    """The first ``n`` (default: all) consecutive windows of ``seq_len`` tokens of a token stream,
    each led by BOS when the tokenizer adds one; returns (windows, their offsets in the stream)."""
    bos = window_bos(tokenizer)
    body = window_body(tokenizer, seq_len)
    count = len(stream) // body if n is None else n
    starts = [k * body for k in range(count)]
    head = [] if bos is None else [bos]
    return [head + stream[s:s + body] for s in starts], starts


def packaged_text(name: str) -> str:
    """A text shipped with actpat (``actpat/probes/<name>.txt``)."""
    from importlib.resources import files

    return (files("actpat") / "probes" / f"{name}.txt").read_text(encoding="utf-8")


def packaged_calibration(tokenizer, n: int, seq_len: int) -> Samples:
    """Up to ``n`` windows of ``seq_len`` tokens cut from the packaged probe texts (all domains,
    in order): calibration for an offline smoke run. Never the held-out text."""
    from .datasets import PROBE_DOMAINS

    stream: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for domain in PROBE_DOMAINS:
        stream += tokenizer(packaged_text(domain), add_special_tokens=False)["input_ids"] + sep
    count = min(n, len(stream) // window_body(tokenizer, seq_len))
    if count < 1:
        raise UserError(f"the packaged texts give {len(stream)} tokens, fewer than one window of "
                        f"{seq_len}; lower the sequence length")
    windows, starts = stream_windows(tokenizer, stream, seq_len, count)
    return Samples(windows, starts, "packaged probe texts (" + ", ".join(PROBE_DOMAINS) + ")",
                   "probes", None, window_start(window_bos(tokenizer)))


def text_windows(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Calibration windows from in-memory texts: the texts joined by blank lines into one token
    stream, cut into consecutive windows of ``seq_len`` tokens (``stream_windows``; the
    remainder dropped)."""
    if seq_len <= 1:
        raise UserError(f"seq_len must be at least 2 (got {seq_len})")
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    if len(stream) < window_body(tokenizer, seq_len):
        raise UserError(f"the calibration texts give {len(stream)} tokens, fewer than one window "
                        f"of {seq_len}; give more text or lower seq_len")
    return stream_windows(tokenizer, stream, seq_len)[0]
