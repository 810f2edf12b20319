"""Streamed perplexity: ``evaluate.perplexity`` with one decoder layer in memory.

The windows are taken in groups; for each group every batch's layer-0 input and layer
arguments are captured (``StreamedModel.capture``), then each decoder layer is read once, run
on every batch of the group and freed; the final norm and LM head (``StreamedModel.head``)
turn the final hidden states into logits and the summed next-token NLL, batch by batch, exactly
as ``evaluate.window_nll`` does. Same windows, same batches, same arithmetic: the same number.
A group holds ``group`` windows' hidden states (``windows x seq_len x hidden x 4`` bytes), so
memory does not grow with the number of layers; each group reads the checkpoint once.
"""

from __future__ import annotations

import math
import time

import torch

from ..models.streamed import StreamedModel, call_layer
from ..data.datasets import window_start
from .evaluate import Corpus, perplexity_windows


@torch.no_grad()
def window_nll_streamed(sm: StreamedModel, ids: torch.Tensor, seq_len: int,
                        limit: int | None = None, batch_size: int = 4, group: int = 64,
                        progress: bool = False, bos: int | None = None) -> tuple[float, int, int]:
    """``evaluate.window_nll`` on a streamed model: (sum of NLL, windows, predicted tokens)."""
    from tqdm.auto import tqdm

    windows = perplexity_windows(ids, seq_len, limit, bos)  # the same windows as in memory
    n = windows.shape[0]
    group = max(batch_size, group // batch_size * batch_size)  # whole batches per group
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=n, desc=f"perplexity {seq_len} (streamed)", unit="window",
               disable=not progress)
    for g in range(0, n, group):
        batches = [windows[i:min(i + batch_size, g + group, n)]
                   for i in range(g, min(g + group, n), batch_size)]
        caught = [sm.capture(input_ids=x) for x in batches]
        hidden = [h for h, _ in caught]
        tuple_out = False
        for i in range(sm.num_layers):
            layer = sm.load_layer(i)
            for b, (_, calls) in enumerate(caught):
                hidden[b], tuple_out = call_layer(layer, hidden[b], calls[i])
            sm.free_layer(i)
        del caught
        for x, h in zip(batches, hidden):
            with sm.head(h, tuple_out) as model:
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += nll.double().cpu()
        bar.update(sum(x.shape[0] for x in batches))
    bar.close()
    return float(total), n, n * (seq_len - 1)


def perplexity_streamed(sm: StreamedModel, corpus: Corpus, seq_len: int,
                        limit: int | None = None, batch_size: int = 4, group: int = 64,
                        progress: bool = False) -> dict:
    """``evaluate.perplexity``'s result for a streamed model, plus ``streamed`` figures."""
    start = time.perf_counter()
    read0, loads0 = sm.bytes_read, sm.layers_loaded
    total, windows, tokens = window_nll_streamed(sm, corpus.ids, seq_len, limit, batch_size,
                                                 group, progress, corpus.bos)
    nll = total / tokens
    wall = time.perf_counter() - start
    return {"ppl": math.exp(nll), "nll": nll, "seq_len": seq_len, "windows": windows,
            "tokens_predicted": tokens, "window_start": window_start(corpus.bos),
            "source": corpus.source, "wall_s": round(wall, 2),
            "windows_per_s": round(windows / wall, 4) if wall > 0 else None,
            "streamed": {"layer_loads": sm.layers_loaded - loads0,
                         "checkpoint_bytes_read": sm.bytes_read - read0, "group": group}}
