"""Evaluation: perplexity on token windows and zero-shot acc / acc_norm through lm-eval.

Perplexity (``wikitext2`` test, rows joined "\\n\\n"; ``c4`` validation, documents joined " "):
the corpus is tokenized once (no special tokens) and cut into non-overlapping windows of
``seq_len`` tokens; a tail shorter than a window is dropped; ``limit`` keeps the first N
windows. Each window is scored on its own with labels = inputs, so its first token is *not*
predicted: ``seq_len - 1`` predictions per window. When the tokenizer puts BOS in front of every
text (Gemma, Llama-2; ``actpat.data.window_bos``) each window is BOS + ``seq_len - 1`` stream
tokens, all predicted; otherwise (SmolLM2, Qwen2) it is ``seq_len`` stream tokens, the first not
predicted. Either way

    ppl = exp( sum of token NLL over all windows / (windows * (seq_len - 1)) ).

Because every window has the same number of predictions this is exactly the Wanda / SparseGPT
evaluation (``exp(sum(loss_w * seqlen) / (windows * seqlen))`` with ``loss_w`` the window's mean
shifted NLL).

Zero-shot (``boolq piqa siqa hellaswag mmlu``): lm-evaluation-harness's ``HFLM`` wraps the
in-memory model and ``simple_evaluate`` runs the task configs of ``actpat.tasks`` (local JSONL
when ``<data-dir>/<task>/<split>.jsonl`` exists, the hub otherwise); ``limit`` keeps the first N
items. acc: argmax of the summed log-likelihood of each choice (the continuation is
target delimiter + choice, tokenized as lm-eval does: trailing context spaces move to the
continuation, the pair is encoded whole and split after the context's tokens); acc_norm: argmax
of the log-likelihood divided by the choice's length in characters (lm-eval 0.4.13's
``acc_norm``; its byte-normalised variant is ``acc_bytes``, not reported).

Every result states its data source and its size (``seq_len`` + ``windows``, or ``n``).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.datasets import (corpus_text, default_data_dir, require_records, window_bos,
                             window_start)
from ..errors import UserError
from ..hub import OFFLINE_FIX, endpoint, prepare_hub
from .tasks import TASKS

PERPLEXITY_SPLITS = {"wikitext2": "test", "c4": "validation"}
ZERO_SHOT_TASKS = tuple(TASKS)
ALL_TASKS = tuple(PERPLEXITY_SPLITS) + ZERO_SHOT_TASKS


def parse_tasks(spec: str | list[str], allowed: tuple[str, ...] = ALL_TASKS,
                what: str = "task") -> list[str]:
    """``--tasks`` as a list of names from ``allowed`` (duplicates dropped, order kept)."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise UserError(f"--tasks is empty; give e.g. {','.join(allowed[:2])}")
    unknown = [t for t in names if t not in allowed]
    if unknown:
        raise UserError(f"unknown {what} '{unknown[0]}': use any of {','.join(allowed)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- perplexity


@dataclass
class Corpus:
    """A tokenized perplexity corpus."""

    name: str
    ids: torch.Tensor  # (T,) int64
    source: str
    bos: int | None = None  # prepended to every window (``actpat.data.window_bos``)


def load_corpus(tokenizer, dataset: str, data_dir: str | None = None) -> Corpus:
    if dataset not in PERPLEXITY_SPLITS:
        raise UserError(f"'{dataset}' is not a perplexity corpus; use one of "
                        f"{', '.join(PERPLEXITY_SPLITS)}")
    text, source = corpus_text(dataset, PERPLEXITY_SPLITS[dataset], data_dir)
    return text_corpus(tokenizer, dataset, text, f"{source} ({PERPLEXITY_SPLITS[dataset]})")


def text_corpus(tokenizer, name: str, text: str, source: str) -> Corpus:
    """Any text as a perplexity corpus: tokenized once without special tokens; its windows follow
    the tokenizer's BOS rule (``actpat.data.datasets.window_bos``)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return Corpus(name, ids.long(), source, window_bos(tokenizer))


def perplexity_windows(ids: torch.Tensor, seq_len: int, limit: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """The first ``limit`` non-overlapping windows of ``ids``, (windows, seq_len): ``seq_len``
    tokens each, or ``bos`` + ``seq_len - 1`` tokens when the tokenizer adds BOS."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    body = seq_len if bos is None else seq_len - 1
    n = ids.numel() // body
    if n == 0:
        raise UserError(f"the corpus has {ids.numel()} tokens, fewer than one window of "
                        f"{seq_len}; lower --seq-len")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1 (got {limit})")
        n = min(n, limit)
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, seq_len: int, limit: int | None = None,
               batch_size: int = 4, progress: bool = False,
               bos: int | None = None) -> tuple[float, int, int]:
    """Summed next-token NLL over the first ``limit`` non-overlapping windows of ``ids``.

    With ``bos`` each window is ``bos`` + ``seq_len - 1`` tokens of ``ids``. Returns (sum of
    NLL, number of windows, number of predicted tokens).
    """
    windows = perplexity_windows(ids, seq_len, limit, bos)
    n = windows.shape[0]
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    from tqdm.auto import tqdm

    for i in tqdm(range(0, n, batch_size), desc=f"perplexity {seq_len}", unit="batch",
                  disable=not progress):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.double().cpu()
    return float(total), n, n * (seq_len - 1)


def perplexity(model, corpus: Corpus, seq_len: int, limit: int | None = None,
               batch_size: int = 4, progress: bool = False) -> dict:
    """``{"ppl", "nll", "seq_len", "windows", "tokens", "source", ...}`` for one corpus."""
    start = time.perf_counter()
    total, windows, tokens = window_nll(model, corpus.ids, seq_len, limit, batch_size, progress,
                                        corpus.bos)
    nll = total / tokens
    wall = time.perf_counter() - start
    return {"ppl": math.exp(nll), "nll": nll, "dtype": model_dtype(model),
            "seq_len": seq_len, "windows": windows,
            "tokens_predicted": tokens, "window_start": window_start(corpus.bos),
            "source": corpus.source, "wall_s": round(wall, 2),
            "windows_per_s": round(windows / wall, 4) if wall > 0 else None}


# --------------------------------------------------------------------------- zero-shot


def task_config(name: str, data_dir: str | None = None) -> tuple[dict, str]:
    """lm-eval config of a zero-shot task, and its data source (local file, else the hub)."""
    task = TASKS[name]
    data_dir = data_dir if data_dir is not None else default_data_dir()
    if data_dir:
        path = Path(data_dir) / name / f"{task.split}.jsonl"
        if path.exists():
            return task.local_config(str(path)), f"local:{path}"
    repo, config = task.hub
    return task.hub_config(), f"hub:{repo}" + (f"/{config}" if config else "")


def _require_source(task: str, source: str, data_dir: str | None) -> None:
    if source.startswith("hub:") and not prepare_hub():
        raise UserError(f"task '{task}': no local {task}/{TASKS[task].split}.jsonl under "
                        f"--data-dir ({data_dir}) and the hub ({endpoint()}) cannot be "
                        f"reached; point --data-dir at the data folder, or {OFFLINE_FIX}")


def require_tasks(tasks: list[str], data_dir: str | None = None) -> None:
    """Fail now, before a model is loaded, when a task's data can be read from nowhere."""
    for name in tasks:
        if name in PERPLEXITY_SPLITS:
            require_records(name, PERPLEXITY_SPLITS[name], data_dir)
        else:
            _require_source(name, task_config(name, data_dir)[1], data_dir)


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None,
              batch_size: int = 4, data_dir: str | None = None,
              log_samples: bool = False, progress: bool = True) -> dict:
    """acc / acc_norm of each task through lm-eval's ``HFLM`` on the in-memory model.

    Each task's entry also holds ``acc_balanced`` (see ``answer_shares``), and ``pred_share``
    and ``gold_share``: the share of items whose
    acc-prediction (highest log-likelihood) and whose gold answer is choice 0, 1, ... (a model
    that always answers "yes" on BoolQ shows up as a ``pred_share`` near [0, 1]). With
    ``log_samples`` it also holds ``samples``: lm-eval's per-item records (arguments,
    log-likelihoods, acc) for checking. Without ``progress`` lm-eval's own bars are silenced.
    """
    configs, sources = prepare_tasks(tasks, limit, data_dir)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    with float32_logits(model):
        return run_tasks(lm, model, tasks, configs, sources, limit, log_samples, progress)


def prepare_tasks(tasks: list[str], limit: int | None,
                  data_dir: str | None) -> tuple[dict, dict]:
    """Each zero-shot task's lm-eval config and data source, checked before any model runs."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    import logging

    for noisy in ("lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    configs, sources = {}, {}
    for name in tasks:
        configs[name], sources[name] = task_config(name, data_dir)
        _require_source(name, sources[name], data_dir)
    return configs, sources


def run_tasks(lm, model, tasks: list[str], configs: dict, sources: dict, limit: int | None,
              log_samples: bool = False, progress: bool = True) -> dict:
    """``zero_shot``'s results for any lm-eval ``LM`` ``lm`` computing with ``model``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    try:
        # our configs are self-contained: skip indexing lm-eval's thousands of built-in YAMLs
        manager = TaskManager(include_defaults=False)
        with _lm_eval_quiet(progress):
            res = lm_eval.simple_evaluate(model=lm, tasks=list(configs.values()), limit=limit,
                                          bootstrap_iters=0, log_samples=True,
                                          verbosity="ERROR", task_manager=manager)
    except AssertionError:  # lm-eval's check that a continuation fits the model's context
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        raise UserError(f"an item of {', '.join(tasks)} is longer than the model's context "
                        f"({context} tokens); use a model with a longer context or drop the "
                        "task") from None
    except Exception as e:
        if sources and any(s.startswith("hub:") for s in sources.values()):
            raise UserError(f"lm-eval failed on a hub dataset ({str(e).splitlines()[0][:160]}); "
                            "point --data-dir at a folder with the task's JSONL") from None
        raise
    wall = time.perf_counter() - start
    out = {}
    for name in tasks:
        key = f"actpat_{name}"
        r = res["results"][key]
        n = int(res["n-samples"][key]["effective"])
        out[name] = {"acc": float(r["acc,none"]), "acc_norm": float(r["acc_norm,none"]),
                     "n": n, "dtype": model_dtype(model), "split": TASKS[name].split,
                     "source": sources[name], **answer_shares(res["samples"][key])}
        if log_samples:
            out[name]["samples"] = res["samples"][key]
    total = sum(v["n"] for v in out.values())
    for v in out.values():  # lm-eval runs all tasks' requests together: one shared rate
        v["items_per_s_all_tasks"] = round(total / wall, 4) if wall > 0 else None
    return out


def model_dtype(model) -> str:
    """The dtype the model computes in, as outputs record it (``bfloat16``, ``float32``...)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


@contextlib.contextmanager
def float32_logits(model):
    """Logits leave the model in float32 whatever it computes in: lm-eval takes log_softmax and
    sums the choice's token log-likelihoods in the logits' dtype, and in bfloat16 (8 bits of
    mantissa) near-tied choices would be ranked by rounding."""
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: out.float())
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _lm_eval_quiet(progress: bool):
    """lm-eval without its noise: it asks git for the *caller's* commit (git prints "fatal: not
    a git repository" outside one; actpat records its own versions), and with ``progress``
    off its tqdm bars (which write to ``sys.stderr`` at call time) go nowhere."""
    from unittest import mock

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None))
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


def answer_shares(samples: list[dict]) -> dict:
    """``pred_share`` / ``gold_share``: per choice index, the share of items predicted (highest
    log-likelihood, lm-eval's acc rule) / labelled with it, rounded to 4 digits; and
    ``acc_balanced``: acc's recall averaged over the gold answers present, which a model that
    always gives the same answer cannot lift above 1 / (number of answers present)."""
    width = max((len(s["resps"]) for s in samples), default=0)
    preds = [max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0]))
             for s in samples]
    golds = [int(s["target"]) for s in samples]

    def share(xs):
        return [round(xs.count(i) / len(xs), 4) for i in range(width)] if xs else []

    recalls = [sum(p == g for p, g in zip(preds, golds) if g == c) / golds.count(c)
               for c in sorted(set(golds))]
    return {"pred_share": share(preds), "gold_share": share(golds),
            "acc_balanced": sum(recalls) / len(recalls) if recalls else None}


# --------------------------------------------------------------------------- both


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, seq_len: int = 256,
             batch_size: int = 4, data_dir: str | None = None, progress: bool = False,
             corpora: dict[str, Corpus] | None = None) -> dict:
    """``{task: {metric: value, ..., size, source}}`` for perplexity corpora and zero-shot tasks.

    ``corpora`` caches tokenized perplexity corpora across calls (filled in place).
    """
    corpora = corpora if corpora is not None else {}
    out = {}
    for name in tasks:
        if name in PERPLEXITY_SPLITS:
            if name not in corpora:
                corpora[name] = load_corpus(tokenizer, name, data_dir)
            out[name] = perplexity(model, corpora[name], seq_len, limit, batch_size, progress)
    shots = [t for t in tasks if t in TASKS]
    if shots:
        out.update(zero_shot(model, tokenizer, shots, limit, batch_size, data_dir,
                             progress=progress))
    return {t: out[t] for t in tasks}


def format_table(results: dict) -> str:
    """One line per task: the figure, its size and its data source."""
    lines = [f"{'task':<10} {'metric':<24} {'size':<22} source"]
    for task, r in results.items():
        if "ppl" in r:
            metric = f"ppl {r['ppl']:.3f}"
            size = f"seq_len {r['seq_len']} x {r['windows']} win"
        else:
            metric = f"acc {r['acc']:.4f} norm {r['acc_norm']:.4f}"
            size = f"n {r['n']} ({r['split']})"
        lines.append(f"{task:<10} {metric:<24} {size:<22} {r['source']}")
    return "\n".join(lines)
