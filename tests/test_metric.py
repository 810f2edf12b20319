"""The batched metric against a plain per-sample autograd loop (tests/reference.py)."""

import pytest
import torch

from actpat.activation.metric import MeanAccumulator, pad_batch, score_batch
from helpers import max_rel_err, random_sequences
from reference import autograd_activations, linear_modules, summed_then_abs
from tiny import ARCHS, VOCAB, tiny_model

LENGTHS = [5, 11, 3, 8, 13, 6, 9, 4]


def batched(model, seqs, batch_size, objective="max-logit", pad_id=0):
    acc = MeanAccumulator()
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], pad_id)
        score_batch(model, ids, mask, [acc], objective)
    assert acc.count == len(seqs)
    return acc.mean()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", ["max-logit", "nll"])
def test_batched_equals_per_sample_autograd(arch, objective):
    model = tiny_model(arch)
    seqs = random_sequences(LENGTHS, VOCAB)
    ref = autograd_activations(model, seqs, objective)
    for bs in (1, 3, 8):
        assert max_rel_err(batched(model, seqs, bs, objective), ref) <= 1e-5, (arch, bs)


def test_summing_objectives_first_is_detectably_wrong():
    model = tiny_model("llama")
    seqs = random_sequences(LENGTHS, VOCAB)
    ref = autograd_activations(model, seqs)
    assert max_rel_err(summed_then_abs(model, seqs), ref) > 1e-2
    assert max_rel_err(batched(model, seqs, 8), ref) <= 1e-5


def test_no_parameter_gets_a_grad_and_requires_grad_is_restored():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = pad_batch(random_sequences([4, 7], VOCAB), 0)
    score_batch(model, ids, mask, [MeanAccumulator()])
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_padding_value_does_not_matter():
    model = tiny_model("qwen2")
    seqs = random_sequences([3, 9, 6], VOCAB)
    a = batched(model, seqs, 3, pad_id=0)
    b = batched(model, seqs, 3, pad_id=VOCAB - 1)
    assert max_rel_err(a, b) < 1e-6


def test_activations_have_the_weight_layout():
    model = tiny_model("gpt2")  # Conv1D stores (in, out)
    got = batched(model, random_sequences([4, 5], VOCAB), 2)
    mods = linear_modules(model)
    assert set(got) == set(mods)
    for name, (_, _, module) in mods.items():
        assert got[name].shape == module.weight.shape
        assert got[name].dtype == torch.float32
    assert got["transformer.h.0.attn.c_attn"].shape == (32, 96)  # (in, out) as stored


@pytest.mark.slow
def test_smollm2_batched_equals_autograd(smollm2):
    model = smollm2.model
    texts = ["The capital of France is", "def add(a, b):\n    return a + b\n\nprint(add(2,",
             "Question: how many legs does a spider have?\nAnswer:",
             "12 + 30 = 42. 7 * 6 = 42. 100 - 58 = 42. The answer to everything, they say, is"]
    seqs = [smollm2.tokenizer(t)["input_ids"] for t in texts]
    assert len({len(s) for s in seqs}) == len(seqs)  # uneven lengths
    ref = autograd_activations(model, seqs)
    for bs in (1, 3, 8):
        assert max_rel_err(batched(model, seqs, bs, pad_id=smollm2.tokenizer.pad_token_id), ref) <= 1e-5
