"""Evaluation: perplexity against a plain per-token loop; zero-shot against an independent
log-likelihood scorer (tiny model, fast) and on SmolLM2 (slow); the eval command's output."""

import json
import math

import pytest
import torch
from helpers import tiny_task_data
from tiny import tiny_model
from tinylm import char_tokenizer, save_tiny_lm

from actpat.cli import main
from actpat.evaluation.evaluate import Corpus, load_corpus, perplexity, window_nll, zero_shot


def slow_perplexity(model, ids, seq_len, limit):
    """Independent reference: one window at a time, one predicted token at a time."""
    total, count = 0.0, 0
    n = min(len(ids) // seq_len, limit)
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seq_len:(w + 1) * seq_len]
            logits = model(input_ids=x[None]).logits[0].double()
            for t in range(1, seq_len):
                logp = logits[t - 1] - torch.logsumexp(logits[t - 1], 0)
                total -= float(logp[x[t]])
                count += 1
    return math.exp(total / count), n, count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_matches_per_token_loop(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (16 * 5 + 7,), generator=torch.Generator().manual_seed(1))
    corpus = Corpus("x", ids, "test")
    for limit, batch in [(3, 2), (100, 4)]:  # limit below and above the 5 full windows
        got = perplexity(model, corpus, 16, limit, batch_size=batch)
        ref, n, count = slow_perplexity(model, ids, 16, limit)
        assert got["windows"] == n and got["tokens_predicted"] == count
        assert got["ppl"] == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, corpus, 16, 100)["windows"] == 5  # the 7-token tail is dropped


def test_window_nll_rejects_bad_sizes():
    from actpat.errors import UserError

    model = tiny_model("llama")
    with pytest.raises(UserError, match="fewer than one window"):
        window_nll(model, torch.arange(10), 16)
    with pytest.raises(UserError, match="--limit"):
        window_nll(model, torch.arange(40), 16, limit=0)


def test_corpus_joins_rows_like_wanda(tmp_path):
    data = tiny_task_data(tmp_path / "data")
    tok = char_tokenizer()
    corpus = load_corpus(tok, "wikitext2", data)
    text = (tmp_path / "data" / "wikitext2" / "test.txt").read_text()
    rows = ["" if line.strip() == "" else line + "\n" for line in text.splitlines()]
    assert corpus.ids.tolist() == tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    assert corpus.source.startswith("local:") and "test" in corpus.source
    c4 = load_corpus(tok, "c4", data)
    assert c4.ids.numel() == len(" ".join(f"Doc {i}: some words here and there." for i in range(40)))


def reference_choice_lls(model, tokenizer, context, choices, delimiter=" "):
    """Independent scorer: sum of log p(continuation tokens | context), lm-eval's token split."""
    out = []
    for choice in choices:
        ctx, cont = context, delimiter + choice
        spaces = len(ctx) - len(ctx.rstrip())
        if spaces:
            ctx, cont = ctx[:-spaces], ctx[-spaces:] + cont
        whole = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
        n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        ids = torch.tensor(whole)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole))))
    return out


def _check_against_reference(model, tok, res, task, docs, prompt, choices_of, gold_of):
    samples = res[task]["samples"]
    assert res[task]["n"] == len(samples)
    acc = acc_norm = 0
    for s in samples:
        doc = docs[s["doc_id"]]
        choices = choices_of(doc)
        ref = reference_choice_lls(model, tok, prompt(doc), choices)
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(ref, abs=2e-4), (task, s["doc_id"])
        pred = max(range(len(ref)), key=lambda i: ref[i])
        pred_norm = max(range(len(ref)), key=lambda i: ref[i] / len(choices[i]))
        acc += pred == gold_of(doc)
        acc_norm += pred_norm == gold_of(doc)
    preds = [max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0])) for s in samples]
    golds = [gold_of(docs[s["doc_id"]]) for s in samples]
    assert res[task]["pred_share"][1] == pytest.approx(preds.count(1) / len(samples), abs=1e-4)
    assert res[task]["gold_share"][0] == pytest.approx(golds.count(0) / len(samples), abs=1e-4)
    assert sum(res[task]["pred_share"]) == pytest.approx(1, abs=1e-3)
    classes = sorted(set(golds))
    recall = [sum(p == g for p, g in zip(preds, golds) if g == c) / golds.count(c) for c in classes]
    assert res[task]["acc_balanced"] == pytest.approx(sum(recall) / len(recall))
    assert res[task]["acc"] == pytest.approx(acc / len(samples))
    assert res[task]["acc_norm"] == pytest.approx(acc_norm / len(samples))


def test_zero_shot_matches_independent_scorer_tiny(tmp_path):
    data = tiny_task_data(tmp_path / "data")
    model, tok = tiny_model("llama"), char_tokenizer()
    res = zero_shot(model, tok, ["piqa", "siqa"], limit=4, batch_size=3, data_dir=data,
                    log_samples=True)
    docs = {t: [json.loads(x) for x in (tmp_path / "data" / t / "validation.jsonl").read_text().splitlines()]
            for t in ("piqa", "siqa")}
    for t in ("piqa", "siqa"):
        assert res[t]["n"] == 4 and 0 <= res[t]["acc"] <= 1 and res[t]["source"].startswith("local:")
    _check_against_reference(model, tok, res, "piqa", docs["piqa"],
                             lambda d: f"Question: {d['goal']}\nAnswer:",
                             lambda d: [d["sol1"], d["sol2"]], lambda d: d["label"])
    _check_against_reference(model, tok, res, "siqa", docs["siqa"],
                             lambda d: f"Q: {d['context']} {d['question']}\nA:",
                             lambda d: [d["answerA"], d["answerB"], d["answerC"]],
                             lambda d: int(d["label"]) - 1)


def test_eval_command_writes_json(tmp_path, capsys):
    data = tiny_task_data(tmp_path / "data")
    model_dir = save_tiny_lm(tmp_path / "m")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", model_dir, "--tasks", "wikitext2,c4,piqa", "--limit", "2",
               "--seq-len", "32", "--data-dir", data, "--device", "cpu", "--json", str(out),
               "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r) == {"wikitext2", "c4", "piqa"}
    assert r["wikitext2"]["seq_len"] == 32 and r["wikitext2"]["windows"] == 2
    assert r["wikitext2"]["ppl"] > 1 and r["c4"]["source"].startswith("local:")
    assert r["piqa"]["n"] == 2 and 0 <= r["piqa"]["acc_norm"] <= 1
    printed = capsys.readouterr().out
    assert "seq_len 32" in printed and "local:" in printed


def test_eval_command_bad_input(tmp_path, capsys, synthetic_data):
    from helpers import fail

    model_dir = save_tiny_lm(tmp_path / "m")
    assert "unknown task 'wikitext3'" in fail(capsys, "eval", "--model", model_dir, "--tasks",
                                              "wikitext3")
    msg = fail(capsys, "eval", "--model", model_dir, "--tasks", "c4", "--seq-len", "4096",
               "--data-dir", synthetic_data)
    assert "exceeds the model's context of 128" in msg
    assert "--limit must be at least 1" in fail(capsys, "eval", "--model", model_dir, "--tasks",
                                                "c4", "--limit", "0")


@pytest.mark.slow
def test_zero_shot_smollm2_matches_independent_scorer(smollm2, data_dir):
    """Real prompts and data (hellaswag: 4 choices, preprocessed fields) on SmolLM2."""
    lm = smollm2
    res = zero_shot(lm.model, lm.tokenizer, ["hellaswag", "mmlu"], limit=1, batch_size=4,
                    data_dir=data_dir, log_samples=True)
    for t in ("hellaswag", "mmlu"):
        assert res[t]["n"] == 1 and 0 <= res[t]["acc"] <= 1 and 0 <= res[t]["acc_norm"] <= 1
    path = f"{data_dir}/hellaswag/validation.jsonl"
    docs = [json.loads(x) for x in open(path).read().splitlines()[:1]]
    _check_against_reference(lm.model, lm.tokenizer, res, "hellaswag", docs,
                             lambda d: f"{d['activity_label']}: {d['ctx']}",
                             lambda d: d["endings"], lambda d: int(d["label"]))
    path = f"{data_dir}/mmlu/test.jsonl"
    docs = [json.loads(x) for x in open(path).read().splitlines()[:1]]
    letters = "ABCD"
    _check_against_reference(
        lm.model, lm.tokenizer, res, "mmlu", docs,
        lambda d: (f"The following are multiple choice questions (with answers) about "
                   f"{d['subject'].replace('_', ' ')}.\n\n{d['question'].strip()}\n"
                   + "".join(f"{letters[i]}. {c}\n" for i, c in enumerate(d["choices"]))
                   + "Answer:"),
        lambda d: list(letters), lambda d: d["answer"])


def test_answer_shares_on_fixed_items():
    from actpat.evaluation.evaluate import answer_shares

    def item(gold, lls):
        return {"target": gold, "resps": [[[ll, False]] for ll in lls]}

    always_yes = [item(1, [-2.0, -1.0]), item(1, [-3.0, -1.0]), item(1, [-2.5, -0.5]),
                  item(0, [-2.0, -1.5])]
    out = answer_shares(always_yes)
    assert out["pred_share"] == [0.0, 1.0] and out["gold_share"] == [0.25, 0.75]
    assert out["acc_balanced"] == 0.5  # acc is 0.75, but one answer for everything
    mixed = always_yes + [item(0, [-1.0, -2.0]), item(2, [-3.0, -2.0, -1.0])]
    out = answer_shares(mixed)  # recalls: class 0: 1/2, class 1: 3/3, class 2: 1/1
    assert out["pred_share"] == [0.1667, 0.6667, 0.1667]
    assert out["acc_balanced"] == pytest.approx((0.5 + 1 + 1) / 3)
