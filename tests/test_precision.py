"""Reduced-precision models compute with float32 sums where sums are formed."""

from __future__ import annotations

import torch

from tiny import tiny_model


def test_zero_shot_log_likelihoods_are_float32_in_a_bfloat16_model():
    """lm-eval sums choice log-likelihoods in the logits' dtype: they must leave the model as
    float32 even when it computes in bfloat16."""
    from actpat.evaluation.evaluate import float32_logits

    model = tiny_model("llama").to(torch.bfloat16).eval()
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert model(input_ids=x).logits.dtype == torch.bfloat16
        with float32_logits(model):
            inside = model(input_ids=x).logits
        assert inside.dtype == torch.float32
        assert model(input_ids=x).logits.dtype == torch.bfloat16  # the hook is gone afterwards
