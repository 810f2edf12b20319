"""Streamed perplexity and zero-shot: ``evaluate`` with one decoder layer in memory.

The windows are taken in groups; for each group every batch's layer-0 input and layer
arguments are captured (``StreamedModel.capture``), then each decoder layer is read once, run
on every batch of the group and freed; the final norm and LM head (``StreamedModel.head``)
turn the final hidden states into logits and the summed next-token NLL, batch by batch, exactly
as ``evaluate.window_nll`` does. Same windows, same batches, same arithmetic: the same number.
A group holds ``group`` windows' hidden states (``windows x seq_len x hidden x 4`` bytes), so
memory does not grow with the number of layers; each group reads the checkpoint once.

Zero-shot runs lm-eval's ``HFLM`` on the model skeleton with one method replaced: its
log-likelihoods (``_loglikelihood_tokens``) are computed by ``loglikelihoods_streamed``, which
builds each request's input exactly as ``HFLM`` does (context + continuation, truncated from the
left to the model's context, last token dropped, right-padded, no attention mask: causal
attention never looks at the padding), runs groups of requests through the layers one layer at
a time, and sums the float32 log-softmax of the continuation's tokens. Tokenisation, prompts,
task configs and scoring stay lm-eval's, as in memory (``evaluate.run_tasks``).
"""

from __future__ import annotations

import math
import time

import torch

from ..models.streamed import StreamedModel, run_layers
from ..data.datasets import window_start
from .evaluate import Corpus, perplexity_windows, prepare_tasks, run_tasks


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
        hidden, tuple_out = run_layers(sm, [{"input_ids": x} for x in batches])
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


# --------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def loglikelihoods_streamed(sm: StreamedModel, pairs: list[tuple[list[int], list[int]]],
                            max_length: int, batch_size: int = 4, group: int = 64,
                            progress: bool = False) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether it is the greedy continuation) for each
    (context tokens, continuation tokens) pair, as ``HFLM._loglikelihood_tokens`` computes it."""
    from tqdm.auto import tqdm

    rows = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths together
    group = max(batch_size, group // batch_size * batch_size)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="log-likelihoods (streamed)", unit="request",
               disable=not progress)
    for g in range(0, len(order), group):
        members = [order[i:i + batch_size] for i in range(g, min(g + group, len(order)),
                                                          batch_size)]
        batches = []
        for idx in members:
            x = torch.zeros(len(idx), max(len(rows[i]) for i in idx), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, :len(rows[i])] = torch.tensor(rows[i])
            batches.append(x)
        hidden, tuple_out = run_layers(sm, [{"input_ids": x} for x in batches])
        for idx, x, h in zip(members, batches, hidden):
            with sm.head(h, tuple_out) as model:
                logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
            for r, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1])
                end = len(rows[i])
                picked = logp[r, end - len(cont):end]
                out[i] = (float(picked.gather(1, cont[:, None]).sum()),
                          bool((picked.argmax(-1) == cont).all()))
            del logp
            bar.update(len(idx))
    bar.close()
    return out


def streamed_lm(sm: StreamedModel, batch_size: int = 4, group: int = 64,
                progress: bool = False):
    """lm-eval's ``HFLM`` on the skeleton of ``sm``, its log-likelihoods streamed."""
    from lm_eval.models.huggingface import HFLM

    from ..errors import UserError

    class StreamedHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            return loglikelihoods_streamed(sm, [(c, k) for _, c, k in requests],
                                           self.max_length, batch_size, group, progress)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise UserError("rolling log-likelihood tasks are not streamed; use perplexity "
                            "tasks (wikitext2, c4) or multiple-choice tasks")

        def generate_until(self, requests, disable_tqdm=False):
            raise UserError("generation tasks are not streamed; use multiple-choice tasks")

    return StreamedHFLM(pretrained=sm.model, tokenizer=sm.tokenizer, batch_size=batch_size,
                        device="cpu")


def zero_shot_streamed(sm: StreamedModel, tasks: list[str], limit: int | None = None,
                       batch_size: int = 4, data_dir: str | None = None, group: int = 64,
                       log_samples: bool = False, progress: bool = False) -> dict:
    """``evaluate.zero_shot``'s result for a streamed model, plus ``streamed`` figures."""
    configs, sources = prepare_tasks(tasks, limit, data_dir)
    read0, loads0 = sm.bytes_read, sm.layers_loaded
    lm = streamed_lm(sm, batch_size, group, progress)
    out = run_tasks(lm, sm.model, tasks, configs, sources, limit, log_samples, progress)
    figures = {"layer_loads": sm.layers_loaded - loads0,
               "checkpoint_bytes_read": sm.bytes_read - read0, "group": group,
               "note": "all tasks' requests run together; figures for the whole run"}
    for v in out.values():
        v["streamed"] = figures
    return out
