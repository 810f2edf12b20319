"""Token windows begin with BOS when the tokenizer adds one (Gemma, Llama-2), as the model expects.

A tiny Llama with a character tokenizer whose post-processor puts ``<s>`` in front of every
text; the perplexity is checked against an independent computation (plain torch, windows built
by hand), and the calibration / corpus-profile windows are checked token by token.
"""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

from tiny import VOCAB, tiny_model
from tinylm import char_tokenizer

CHARS = string.printable[:95]
SPECIAL = ["<unk>", "</s>", "<s>"]
BOS = 2


def bos_tokenizer():
    """One token per printable character, ``<s>`` (id 2) in front of every encoded text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   pad_token="</s>", bos_token="<s>")


TEXT = ("The river bends twice before it reaches the old mill. " * 8
        + "Snow fell on the hills all night, and the roads were closed by morning. " * 8)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "data"
    (d / "wikitext2").mkdir(parents=True)
    (d / "wikitext2" / "test.txt").write_text("\n".join(TEXT[i:i + 70] for i in range(0, len(TEXT), 70)))
    (d / "c4").mkdir()
    docs = [{"text": TEXT[k:] + " end of document number " + str(k)} for k in range(0, 400, 37)]
    for split in ("train", "validation"):
        (d / "c4" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in docs))
    return d


def test_window_bos_detects_the_tokenizer_rule():
    from actpat.data.datasets import window_bos

    assert window_bos(bos_tokenizer()) == BOS
    assert window_bos(char_tokenizer()) is None  # adds no BOS: today's plain windows


def reference_ppl(model, stream: list[int], seq_len: int, bos: int | None, limit: int) -> float:
    """Windows built by hand, one forward each, NLL summed over the predicted tokens."""
    body = seq_len - (bos is not None)
    nll, count = 0.0, 0
    for w in range(min(limit, len(stream) // body)):
        window = ([bos] if bos is not None else []) + stream[w * body:(w + 1) * body]
        x = torch.tensor([window])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        for t in range(1, len(window)):
            nll -= float(logp[t - 1, window[t]])
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("make_tok, bos", [(bos_tokenizer, BOS), (char_tokenizer, None)])
def test_perplexity_windows_follow_the_bos_rule(corpus_dir, make_tok, bos):
    from actpat.evaluation.evaluate import load_corpus, perplexity

    tok = make_tok()
    model = tiny_model("llama").eval()
    corpus = load_corpus(tok, "wikitext2", str(corpus_dir))
    stream = corpus.ids.tolist()
    assert BOS not in stream  # the stream itself is encoded without special tokens
    res = perplexity(model, corpus, seq_len=16, limit=5, batch_size=2)
    assert res["window_start"] == ("bos" if bos is not None else "stream")
    assert res["windows"] == 5 and res["tokens_predicted"] == 5 * 15
    assert res["ppl"] == pytest.approx(reference_ppl(model, stream, 16, bos, 5), rel=1e-6)


def test_bos_and_plain_windows_give_different_perplexities(corpus_dir):
    """The rule matters: the same model scores BOS windows and plain windows differently."""
    from actpat.evaluation.evaluate import load_corpus, perplexity

    model = tiny_model("llama").eval()
    with_bos = perplexity(model, load_corpus(bos_tokenizer(), "wikitext2", str(corpus_dir)), 16, 5)
    plain = perplexity(model, load_corpus(char_tokenizer(), "wikitext2", str(corpus_dir)), 16, 5)
    assert with_bos["ppl"] != pytest.approx(plain["ppl"], rel=1e-4)


def is_run(seq: list[int], stream: list[int]) -> bool:
    return any(stream[i:i + len(seq)] == seq for i in range(len(stream) - len(seq) + 1))


@pytest.mark.parametrize("dataset", ["c4", "wikitext2"])
def test_corpus_profile_windows_begin_with_bos(corpus_dir, dataset):
    from actpat.data.datasets import load_records, sample_sequences

    tok = bos_tokenizer()
    s = sample_sequences(tok, dataset, 4, 24, seed=1, data_dir=str(corpus_dir))
    assert s.window_start == "bos"
    rows = load_records(dataset, None, str(corpus_dir)).rows
    texts = [r["text"] for r in rows] if dataset == "c4" else ["\n\n".join(r["text"] for r in rows)]
    streams = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for seq in s.sequences:
        assert len(seq) == 24 and seq[0] == BOS and BOS not in seq[1:]
        assert any(is_run(seq[1:], st) for st in streams)  # 23 consecutive stream tokens
    plain = sample_sequences(char_tokenizer(), dataset, 4, 24, seed=1, data_dir=str(corpus_dir))
    assert plain.window_start == "stream" and all(len(q) == 24 for q in plain.sequences)


def test_qa_calibration_windows_begin_with_bos(tmp_path):
    from actpat.data.calibration import calibration_sequences

    d = tmp_path / "data" / "boolq"
    d.mkdir(parents=True)
    rows = [{"passage": f"Passage number {i} talks about rivers and mills.", "question":
             f"is this passage {i} about rivers", "answer": i % 2 == 0} for i in range(60)]
    (d / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = bos_tokenizer()
    s = calibration_sequences(tok, "boolq", 3, 32, seed=0, data_dir=str(tmp_path / "data"),
                              exclude_first=10)
    assert s.window_start == "bos"
    assert all(len(q) == 32 and q[0] == BOS and BOS not in q[1:] for q in s.sequences)
    # consecutive windows: each continues the stream where the previous one stopped
    ref = calibration_sequences(char_tokenizer(), "boolq", 3, 31, seed=0,
                                data_dir=str(tmp_path / "data"), exclude_first=10)
    shift = [[t + 1 if t >= 2 else t for t in q] for q in ref.sequences]  # <s> took id 2
    assert [q[1:] for q in s.sequences] == shift

