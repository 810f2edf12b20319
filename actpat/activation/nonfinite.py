"""Non-finite values (overflow, e.g. in float16): find the first module that produced them.

A non-finite objective, or a silently all-zero activation map (an overflowing hidden state that a
later RMSNorm turns into zeros), has a first cause: one module whose output stopped being finite.
``NonFiniteWatch`` puts a forward hook on every decoder layer and every scored matrix, and
remembers the first of them (in forward order) whose output holds inf or nan. The profile loop
asks it after each batch and reports that module's name, with the fix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


class NonFiniteWatch:
    """Context manager: ``first`` is the name of the first module with a non-finite output."""

    def __init__(self, model: nn.Module, dtype: str | None = None) -> None:
        from ..models.architectures import decoder_layers, get_adapter, scored_matrices

        self.first: str | None = None
        self.dtype = dtype
        self.flags: list[tuple[str, torch.Tensor]] = []  # (module, all-finite flag), no sync
        prefix = get_adapter(model).layers
        self.modules = [(f"{prefix}.{i}", layer) for i, layer in enumerate(decoder_layers(model))]
        self.modules += [(m.name, m.module) for m in scored_matrices(model)]
        self.handles: list = []

    def __enter__(self) -> "NonFiniteWatch":
        for name, module in self.modules:
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.flags.append((name, torch.isfinite(out.detach()).all()))
        return hook

    def check(self) -> None:
        """Raise the user-facing error when a non-finite output was seen (one device sync)."""
        if self.flags and self.first is None:
            ok = torch.stack([f.to(self.flags[0][1].device) for _, f in self.flags])
            if not bool(ok.all()):
                self.first = self.flags[int((~ok).nonzero()[0])][0]
        self.flags.clear()
        if self.first is not None:
            raise UserError(non_finite_message(self.first, self.dtype))


def non_finite_message(where: str, dtype: str | None = None) -> str:
    fix = "use --dtype float32" if dtype in ("float16", "fp16", "bfloat16", "bf16") else \
        "check the model's weights (inf/nan or overflowing values) or use --dtype float32"
    return f"non-finite values (overflow?) first appear in the output of {where}; {fix}"
