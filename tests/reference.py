"""Independent slow references used by the tests: plain autograd, one sample at a time."""

import torch

from actpat.models.loading import scored_matrices


def autograd_activations(model, sequences, objective="max-logit"):
    """Mean over samples of |w * df(s)/dw|, one unpadded backward per sample, on the full model."""
    mats = scored_matrices(model)
    sums = {m.name: torch.zeros_like(m.module.weight, dtype=torch.float32) for m in mats}
    for p in model.parameters():
        p.requires_grad_(True)
    for seq in sequences:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        if objective == "max-logit":
            f = logits[-1].max()
        else:
            logp = torch.log_softmax(logits[:-1].float(), -1)
            f = -logp.gather(-1, ids[0, 1:, None]).mean()
        f.backward()
        for m in mats:
            w = m.module.weight
            sums[m.name] += (w.detach() * w.grad).abs().float()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return {k: v / len(sequences) for k, v in sums.items()}


def summed_then_abs(model, sequences):
    """The wrong shortcut: |w * d(sum_s f(s))/dw| / n. Tests show the metric differs from it."""
    mats = scored_matrices(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for seq in sequences:
        model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].max().backward()
    out = {m.name: (m.module.weight.detach() * m.module.weight.grad).abs() / len(sequences)
           for m in mats}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return out
