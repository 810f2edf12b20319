"""Dataset registry, prompt formats and seeded sampling on the local data dir."""

import json

import pytest

from actpat.data.datasets import DATASETS, PROMPTS, load_records, record_texts, sample_sequences
from actpat.errors import UserError
from helpers import CharTok

TOK = CharTok(1000)  # one id per character (no special tokens), for fast data tests
REGISTERED = ["boolq", "piqa", "siqa", "hellaswag", "mmlu", "gsm8k", "humaneval", "c4",
              "wikitext2", "stsb", "sick"]


def test_registry_has_the_papers_datasets():
    assert set(REGISTERED) <= set(DATASETS)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_dataset_loads_locally(name, any_data):
    rec = load_records(name, data_dir=any_data)
    assert rec.source.startswith(f"local:{any_data}") and len(rec.rows) > 100
    s = sample_sequences(TOK, name, 5, seq_len=64, seed=1, data_dir=any_data)
    assert len(s.sequences) == 5 and all(0 < len(x) <= 64 for x in s.sequences)


def test_lm_eval_prompt_formats():
    assert PROMPTS["boolq"]({"passage": "P", "question": "is it"}) == "P\nQuestion: is it?\nAnswer:"
    assert PROMPTS["piqa"]({"goal": "G"}) == "Question: G\nAnswer:"
    assert PROMPTS["siqa"]({"context": "C", "question": "Q"}) == "Q: C Q\nA:"
    mmlu = PROMPTS["mmlu"]({"question": " Q ", "subject": "high_school_math",
                            "choices": ["a", "b", "c", "d"]})
    assert mmlu == ("The following are multiple choice questions (with answers) about high "
                    "school math.\n\nQ\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_sampling_is_seeded_and_windows_are_full(any_data):
    a = sample_sequences(TOK, "boolq", 6, 32, seed=3, data_dir=any_data)
    b = sample_sequences(TOK, "boolq", 6, 32, seed=3, data_dir=any_data)
    c = sample_sequences(TOK, "boolq", 6, 32, seed=4, data_dir=any_data)
    assert a.sequences == b.sequences and a.indices == b.indices and a.indices != c.indices
    for name in ("c4", "wikitext2"):
        w = sample_sequences(TOK, name, 4, 50, seed=0, data_dir=any_data)
        assert all(len(x) == 50 for x in w.sequences)


def test_long_texts_keep_their_first_tokens(data_dir):
    s = sample_sequences(TOK, "boolq", 3, 20, seed=0, data_dir=data_dir)
    rec = load_records("boolq", data_dir=data_dir)
    texts = record_texts("boolq", rec)
    for seq, i in zip(s.sequences, s.indices):
        assert seq == TOK(texts[i])["input_ids"][:20]


def test_local_files_are_datasets_in_file_order(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"text {i}", "q": i}) for i in range(5)))
    s = sample_sequences(TOK, str(p), 3, 100, text_field="body")
    assert s.sequences == [TOK(f"text {i}")["input_ids"] for i in range(3)]
    s = sample_sequences(TOK, str(p), 2, 100, template="Q{q}: {body}")
    assert s.sequences[1] == TOK("Q1: text 1")["input_ids"]
    t = tmp_path / "mine.txt"
    t.write_text("first line\n\nsecond line\n")
    assert len(sample_sequences(TOK, str(t), 2, 100).sequences) == 2


def test_bad_data_input(tmp_path, data_dir):
    with pytest.raises(UserError, match="unknown dataset"):
        sample_sequences(TOK, "nosuch", 2)
    with pytest.raises(UserError, match="at least 1"):
        sample_sequences(TOK, "boolq", 0, data_dir=data_dir)
    with pytest.raises(UserError, match="more than the"):
        sample_sequences(TOK, "humaneval", 500, data_dir=data_dir)
    with pytest.raises(UserError, match="not found"):
        sample_sequences(TOK, str(tmp_path / "missing.jsonl"), 2)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        sample_sequences(TOK, str(tmp_path / "empty.jsonl"), 2)
    (tmp_path / "f.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UserError, match="no field 'text'"):
        sample_sequences(TOK, str(tmp_path / "f.jsonl"), 1)


GOLD_ROWS = {  # a fixed local row of each task, and the answer text lm-eval scores as right
    "boolq": ({"passage": "p", "question": "q", "answer": True}, " yes"),
    "piqa": ({"goal": "g", "sol1": "first", "sol2": "second", "label": 1}, " second"),
    "siqa": ({"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c3",
              "label": "2"}, " b"),
    "hellaswag": ({"activity_label": "x", "ctx": "y", "endings": ["e0", "e1", "e2", "e3"],
                   "label": "3"}, " e3"),
    "mmlu": ({"subject": "s", "question": "q", "choices": ["w", "x", "y", "z"], "answer": 2},
             " C"),
}


@pytest.mark.parametrize("name", sorted(GOLD_ROWS))
def test_calibration_answer_is_the_tasks_gold_choice(name):
    """QA calibration appends the very choice the zero-shot task scores as correct."""
    from actpat.data.datasets import gold_answer
    from actpat.evaluation.tasks import TASKS

    row, expected = GOLD_ROWS[name]
    assert gold_answer(name, row) == expected
    cfg = TASKS[name].local_config("unused.jsonl")
    if "process_docs" in cfg:  # hellaswag: lm-eval reads the fields process_docs builds
        from datasets import Dataset

        doc = cfg["process_docs"](Dataset.from_list([row]))[0]
        choices, gold = doc["choices"], int(doc["gold"])
    else:
        choices, gold = cfg["doc_to_choice"](row), cfg["doc_to_target"](row)
    assert " " + choices[gold] == expected


def test_gold_answer_of_generation_sets_and_broken_rows():
    from actpat.data.datasets import gold_answer

    assert gold_answer("gsm8k", {"question": "q", "answer": "4"}) == " 4"
    assert gold_answer("humaneval", {"prompt": "def f():", "canonical_solution": "  return 1"}) \
        == "  return 1"
    assert gold_answer("piqa", {"goal": "g"}) == ""  # no label: no answer, no crash
    assert gold_answer("c4", {"text": "t"}) == ""
