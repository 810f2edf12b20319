"""Shared test scaffolding: stubs, random inputs, comparisons, command runners, synthetic data.

Nothing here computes a number that a test checks against actpat: the independent references
live in ``reference.py``. Fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROSE = ROOT / "actpat" / "probes" / "prose.txt"
QUESTIONS = ROOT / "actpat" / "probes" / "questions.txt"


def has(module: str) -> bool:
    """True when an optional module can be imported (for skips naming a missing package)."""
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- stubs


class PadTok:
    """The one tokenizer attribute ``compute_profile`` / ``pair_similarity`` read."""

    pad_token_id = 0


class LM:
    """The parts of ``LoadedModel`` that the library's loops use: a model and a pad id."""

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else PadTok()
        self.spec, self.identity = "tiny", {"spec": "tiny"}


class CharTok:
    """Characters to ids in [1, vocab): enough for ``sample_sequences`` on local files."""

    pad_token_id = 0

    def __init__(self, vocab: int = 1000, offset: int = 0):
        self.vocab, self.offset = vocab, offset

    def __call__(self, text, add_special_tokens=True):
        if self.offset:
            return {"input_ids": [self.offset + ord(c) % (self.vocab - self.offset)
                                  for c in text]}
        return {"input_ids": [ord(c) % self.vocab for c in text]}


# --------------------------------------------------------------------------- random inputs


def random_sequences(lengths, vocab: int = 101, seed: int = 0, low: int = 3) -> list[list[int]]:
    """One token list per length, ids in [low, vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


def random_lengths_sequences(n: int, seed: int = 0, lo: int = 4, hi: int = 20,
                             vocab: int = 101) -> list[list[int]]:
    """``n`` sequences of random lengths in [lo, hi), ids in [2, vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def calib(n: int = 7, t: int = 24, seed: int = 0, vocab: int = 101) -> list[list[int]]:
    """Equal-length calibration sequences (n x t)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=g).tolist()


# --------------------------------------------------------------------------- comparisons


def max_rel_err(got: dict, ref: dict) -> float:
    """Largest relative Frobenius error over the keys (which must match)."""
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))[:5]
    return max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def max_rel_abs(a: dict, b: dict) -> float:
    """Largest entry-wise error relative to each reference tensor's largest entry."""
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- running commands

PROGRESS = re.compile(r"(it/s\]|s/it\]|examples/s\]|Loading weights|Writing model|\d+%\|)")
MESSAGE = re.compile(r"actpat \S+: (?:error|interrupted)[^\r\n]*")


def run(*argv) -> None:
    """Run one command in this process; it must succeed."""
    from actpat.cli import main

    assert main([str(a) for a in argv]) == 0


def ok(capsys, *argv) -> str:
    """Run a command that must succeed; return its stdout."""
    from actpat.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def one_line(err: str, command: str, kind: str = "error") -> str:
    """The single ``actpat COMMAND: <kind>...`` line of ``err``; nothing else but progress bars."""
    assert "Traceback" not in err, err
    msgs = MESSAGE.findall(err)
    assert len(msgs) == 1, err
    assert msgs[0].startswith(f"actpat {command}: {kind}"), msgs[0]
    rest = MESSAGE.sub("", err)
    noise = [f for f in re.split(r"[\r\n]+", rest) if f.strip() and not PROGRESS.search(f)]
    assert not noise, noise
    return msgs[0]


def fail(capsys, *argv) -> str:
    """Run the command; assert exit 2, exactly one message line, no traceback; return it.

    Progress bars of libraries (tqdm, carriage-return lines) may surround the message."""
    from actpat.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    return one_line(err, str(argv[0]))


def interrupted(capsys, *argv) -> str:
    """Run a command whose work raises KeyboardInterrupt: exit 130, one 'interrupted' line."""
    from actpat.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 130, (rc, err)
    return one_line(err, str(argv[0]), "interrupted")


def raise_on_call(n: int, real, exc=KeyboardInterrupt):
    """A stand-in for ``real`` that behaves like it until its ``n``-th call, which raises."""
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc()
        return real(*a, **k)

    wrapper.calls = calls
    return wrapper


# --------------------------------------------------------------------------- HTML tables


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._row, self._in = [], None, None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(html: str) -> list[list[dict]]:
    """Every <table> of a page as a list of {header: cell text} rows."""
    p = _Tables()
    p.feed(html)
    out = []
    for t in p.tables:
        if len(t) < 2:
            continue
        header = t[0]
        out.append([dict(zip(header, r)) for r in t[1:]])
    return out


def table_has(html: str, **cells) -> bool:
    """True when one row of one table has every ``header=value`` given (headers with spaces:
    pass them through a dict: ``table_has(html, **{"seq len": "32"})``)."""
    for table in html_tables(html):
        for row in table:
            if all(row.get(k) == v for k, v in cells.items()):
                return True
    return False


# --------------------------------------------------------------------------- synthetic data

WORDS = ("the a river stone quick light old map door green seven north open sun water tree "
         "house small large road bird cold warm city field song paper glass iron").split()


def make_synthetic_data(root: Path, rows: int = 420, seed: int = 0) -> Path:
    """A data folder with every registered dataset's default split in the local layout
    (``<name>/<split>.jsonl|.txt``), ``rows`` short records each (more than the 300 rows the
    QA-calibration leak checks skip), made of random words: small, fast, deterministic."""
    rng = random.Random(seed)
    root = Path(root)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def sentence(n):
        return words(n).capitalize() + "."

    def write(name, split, records):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    for split in ("train", "validation"):
        write("c4", split, [{"text": " ".join(sentence(rng.randint(6, 12)) for _ in range(4))
                                     + f" ({split} {i})"} for i in range(rows)])
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    lines = []
    for a in range(rows // 10):
        lines += [" ", f" = {words(2).title()} {a} = ", " "]
        lines += [" " + " ".join(sentence(rng.randint(5, 10)) for _ in range(3))
                  for _ in range(7)]
    (root / "wikitext2" / "test.txt").write_text("\n".join(lines) + "\n")
    write("boolq", "validation", [{"question": words(5) + f" {i}", "passage": sentence(12),
                                   "answer": rng.random() < 0.5} for i in range(rows)])
    write("piqa", "validation", [{"goal": f"how to {words(4)} {i}", "sol1": words(5),
                                  "sol2": words(6), "label": rng.randint(0, 1)}
                                 for i in range(rows)])
    write("siqa", "validation", [{"context": sentence(8) + f" {i}", "question": "Why?",
                                  "answerA": words(3), "answerB": words(2),
                                  "answerC": words(4), "label": str(rng.randint(1, 3))}
                                 for i in range(rows)])
    write("hellaswag", "validation", [{"ctx": sentence(8) + f" {i}", "activity_label": words(2),
                                       "endings": [words(4) for _ in range(4)],
                                       "label": str(rng.randint(0, 3)), "source_index": i}
                                      for i in range(rows)])
    for split in ("test", "dev"):
        write("mmlu", split, [{"question": sentence(8) + f" {i}", "subject": "high_school_math",
                               "choices": [words(2) for _ in range(4)],
                               "answer": rng.randint(0, 3)} for i in range(rows)])
    write("gsm8k", "test", [{"question": f"{sentence(8)} {i} plus {i + 1}?",
                             "answer": f"#### {2 * i + 1}"} for i in range(rows)])
    write("humaneval", "test", [{"task_id": f"HumanEval/{i}",
                                 "prompt": f"def f{i}(x):\n    \"\"\"{sentence(5)}\"\"\"\n",
                                 "canonical_solution": f"    return x + {i}\n", "test": "",
                                 "entry_point": f"f{i}"} for i in range(rows)])
    write("stsb", "validation", [{"sentence1": sentence(6), "sentence2": sentence(6),
                                  "score": round(rng.uniform(0, 5), 2)} for _ in range(rows)])
    write("sick", "test", [{"pair_ID": i, "sentence_A": sentence(6), "sentence_B": sentence(6),
                            "relatedness_score": round(rng.uniform(1, 5), 2),
                            "entailment_label": "NEUTRAL"} for i in range(rows)])
    return root


def tiny_task_data(root) -> str:
    """A data dir with tiny wikitext2 / c4 / piqa / siqa files (short texts for a 128-token model)."""
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "test.txt").write_text(" \n = Title = \n \n" + " The cat sat on the mat .\n" * 30)
    (root / "c4").mkdir()
    (root / "c4" / "validation.jsonl").write_text(
        "".join(json.dumps({"text": f"Doc {i}: some words here and there."}) + "\n" for i in range(40)))
    (root / "piqa").mkdir()
    rows = [{"goal": f"open jar {i}", "sol1": "twist lid", "sol2": "hit it" + "!" * i,
             "label": i % 2} for i in range(6)]
    (root / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "siqa").mkdir()
    rows = [{"context": f"Ann met Bo {i}.", "question": "Why?", "answerA": "to talk",
             "answerB": "to eat", "answerC": "to run far", "label": str(1 + i % 3)} for i in range(6)]
    (root / "siqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)
