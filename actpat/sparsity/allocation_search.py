"""Activation-guided search over layer sparsities, scored on held-apart calibration windows.

The ``search`` allocator starts from the paper's activation allocation (docs/method.md section 4)
and improves it by an EvoPress-style (1 + lambda) evolutionary search (Sieberling et al.,
"EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search", arXiv
2410.14649): each generation makes ``offspring`` children of the incumbent, each by 1 to
``max_moves`` random *pair moves*, and the best child replaces the incumbent only when it
scores strictly lower. A pair move takes sparsity from one layer and gives it to another,
S_i += delta * w_bar / w_i, S_j -= delta * w_bar / w_j (w the layer sizes, w_bar their mean), so
the parameter-weighted mean stays exactly S; a move that would leave [lo, hi] is redrawn.
delta halves after ``patience`` generations without improvement (not below ``min_step``).

Why a hand-written move set and not a maintained optimiser (nevergrad, optuna's CMA-ES,
``cma``): the search space is the simplex-like set {S_i in [lo, hi], sum_i w_i S_i = S sum w}.
Pair moves stay on it by construction, whereas CMA-ES or nevergrad sample the whole box and
would need a projection (``fix_mean``) that distorts the distribution they adapt; and CMA-ES in
30 dimensions needs a population of about 14 and hundreds of evaluations to adapt its
covariance, an order of magnitude more than the budget a CPU affords (one candidate costs
seconds). EvoPress itself uses the same level-switch mutation with (1 + lambda) selection.

Determinism and resuming: generation g draws its moves from ``numpy.random.default_rng([seed,
g])``, so a run is a function of (start, seed, settings, scores); with ``state_path`` the
incumbent, its score, the step, the counters and the history are written atomically after
every generation, and a rerun with the same start, seed and settings continues from there
(a larger budget continues the same search). The budget counts scored candidates (the start
included); a candidate already scored is looked up, not re-scored.

The scorer (``MaskScorer``) never prunes from scratch. It makes one sequential pass of the
calibration windows at a *reference* allocation (the start), exactly as the Wanda pruner does
(each layer's input norms are measured on the outputs of the already pruned previous layers),
and keeps, for every scored matrix, the rank of each weight's Wanda score |W| * ||X||_2 within
its row. A candidate S_i then costs no calibration pass: layer i's mask is "rank <
round(S_i * columns)" (the Wanda pruner's own rounding and stable tie order), applied to a dense
copy of the weights; only layers whose S_i changed are rewritten. At the reference allocation
the model is exactly the one ``actpat prune --pruner wanda`` makes; elsewhere the input norms
are those of the reference (the approximation that makes a candidate cheap). The candidate is
scored on held-apart calibration windows, never on evaluation data: ``kl`` (default) is the
mean over predicted tokens of KL(dense || pruned) of the next-token distributions, the dense
model's log-probabilities computed once; ``ppl`` is the perplexity of the windows' own next
tokens. The allocation found is then pruned by whichever pruner the user chose.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .allocation import MAX_SPARSITY, Option, register_allocator
from .per_matrix import activation_matrix_formula, fix_matrix_mean, flatten, unflatten

DEFAULT_BUDGET = 64  # scored candidates: about 10 min of one CPU core for SmolLM2 (see its doc)
DEFAULT_STEP = 0.02
DEFAULT_HELD = 8  # held-apart calibration windows that score a candidate
HELD_OPTION = Option("held_windows", DEFAULT_HELD, "atp, search: held-apart calibration "
                     "windows, drawn after the pruning ones, that score a candidate (8)")


@dataclass
class SearchSettings:
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    step: float = DEFAULT_STEP
    offspring: int = 4
    max_moves: int = 3
    min_step: float = 0.005
    patience: int = 2
    lo: float = 0.0
    hi: float = MAX_SPARSITY

    def check(self) -> None:
        if self.budget < 1:
            raise UserError(f"--search-budget must be at least 1 candidate (got {self.budget})")
        if not 0 < self.step < 1 or self.offspring < 1 or self.max_moves < 1:
            raise UserError("search settings: step in (0, 1), offspring and max_moves >= 1")
        if not 0 <= self.lo < self.hi < 1:
            raise UserError(f"search bounds must satisfy 0 <= lo < hi < 1 (got {self.lo}, "
                            f"{self.hi})")


@dataclass
class SearchResult:
    sparsities: list[float]
    score: float
    start_score: float
    evaluations: int
    generations: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per generation: best child, accepted

    def to_json(self) -> dict:
        return asdict(self)


def pair_move(values: np.ndarray, i: int, j: int, delta: float, weights: np.ndarray) -> np.ndarray:
    """Move ``delta`` (in mean-layer units) of sparsity from layer j to layer i; the
    ``weights``-weighted mean is unchanged."""
    out = values.copy()
    w_bar = weights.mean()
    out[i] += delta * w_bar / weights[i]
    out[j] -= delta * w_bar / weights[j]
    return out


def _mutate(x: np.ndarray, rng: np.random.Generator, s: SearchSettings, step: float,
            w: np.ndarray) -> np.ndarray:
    y = x.copy()
    for _ in range(int(rng.integers(1, s.max_moves + 1))):
        for _try in range(32):  # redraw pairs that would leave the bounds
            i, j = (int(v) for v in rng.choice(len(y), size=2, replace=False))
            z = pair_move(y, i, j, step, w)
            if s.lo <= z[i] <= s.hi and s.lo <= z[j] <= s.hi:
                y = z
                break
    return y


def _key(x: np.ndarray) -> tuple:
    return tuple(np.round(x, 10).tolist())


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def evolve(start: Sequence[float], score: Callable[[list[float]], float],
           layer_sizes: Sequence[int] | None = None, settings: SearchSettings | None = None,
           state_path: str | Path | None = None, log=None) -> SearchResult:
    """Minimise ``score(S_i)`` from ``start`` by mean-preserving pair moves (module doc)."""
    s = settings or SearchSettings()
    s.check()
    x = np.asarray(start, dtype=np.float64)
    w = np.ones_like(x) if layer_sizes is None else np.asarray(layer_sizes, dtype=np.float64)
    if len(w) != len(x) or len(x) < 2:
        raise UserError("the search needs at least two layers and one size per layer")
    if x.min() < s.lo - 1e-12 or x.max() > s.hi + 1e-12:
        raise UserError(f"the search's start leaves [{s.lo}, {s.hi}]; give a start inside")
    begin = time.perf_counter()
    identity = {"start": _key(x), "sizes": w.tolist(),
                **{k: v for k, v in asdict(s).items() if k != "budget"}}
    path = Path(state_path) if state_path else None
    state = json.loads(path.read_text()) if path is not None and path.exists() else None
    if state is not None and state.get("identity") != json.loads(json.dumps(identity)):
        raise UserError(f"{path} holds a search with another start or settings; delete it "
                        "or use another state file")
    if state is None:
        fx = float(score(x.tolist()))
        state = {"identity": identity, "seen": [[list(_key(x)), fx]], "seconds": 0.0,
                 "done": {"x": x.tolist(), "fx": fx, "generation": 0, "step": s.step,
                          "stall": 0, "history": []}}
    cache = {tuple(k): v for k, v in state["seen"]}
    start_score = cache[_key(x)]

    def save():  # the clock runs across restarts: ``seconds`` is the search's total cost
        state["seconds"] += time.perf_counter() - t0[0]
        t0[0] = time.perf_counter()
        if path is not None:
            _write_atomic(path, state)

    t0 = [begin]
    # ``done``: the state after the last complete generation (what a resumed run starts from);
    # a generation the budget cuts short is selected from but not committed, so a resumed run
    # redoes it (its children come from the same generator, their scores from ``seen``).
    cur = dict(state["done"])
    while len(cache) < s.budget:
        g = cur["generation"]
        x = np.asarray(cur["x"], dtype=np.float64)
        rng = np.random.default_rng([s.seed, g])
        children, complete = [], True
        for _ in range(s.offspring):
            y = _mutate(x, rng, s, cur["step"], w)
            k = _key(y)
            if k not in cache:
                if len(cache) >= s.budget:
                    complete = False
                    break
                cache[k] = float(score(y.tolist()))
                state["seen"].append([list(k), cache[k]])
            children.append((cache[k], y))
        nxt = dict(cur, history=list(cur["history"]), generation=g + 1)
        if children:
            best_f, best_y = min(children, key=lambda c: c[0])
            if best_f < cur["fx"]:
                nxt.update(x=best_y.tolist(), fx=best_f, stall=0)
            else:
                nxt["stall"] = cur["stall"] + 1
                if nxt["stall"] >= s.patience:
                    nxt.update(step=max(s.min_step, cur["step"] / 2), stall=0)
            nxt["history"].append({"generation": g, "best_child": best_f,
                                   "accepted": best_f < cur["fx"], "incumbent": nxt["fx"],
                                   "step": nxt["step"], "evaluations": len(cache)})
            if log is not None:
                log(f"search gen {g}: best child {best_f:.5f}, incumbent {nxt['fx']:.5f} "
                    f"({len(cache)}/{s.budget} candidates, step {nxt['step']:g})")
        cur = nxt
        if not complete:
            break
        state["done"] = cur
        save()
        if g > 20 * s.budget:  # every child already scored for very long: nothing new to try
            break
    save()
    return SearchResult([float(v) for v in cur["x"]], cur["fx"], start_score, len(cache),
                        cur["generation"], round(state["seconds"], 3), cur["history"])


# --------------------------------------------------------------------------- the scorer


def _prune_count(total: int, sparsity: float) -> int:
    """round(total * sparsity), halves up: the Wanda pruner's count per row."""
    return min(total, int(math.floor(total * sparsity + 0.5)))


class MaskScorer:
    """score(S_i) = KL(dense || pruned) (or perplexity) on held-apart calibration windows, with
    Wanda masks from one sequential pass at ``reference`` (see the module doc). Restores the
    dense weights with ``restore()`` (also done when used as a context manager)."""

    def __init__(self, model, calib_inputs: list[list[int]], held_inputs: list[list[int]],
                 reference: Sequence[float], metric: str = "kl", batch_size: int = 4,
                 progress: bool = False):
        import torch

        from ..models.architectures import decoder_layers, scored_matrices
        from .layerwise import capture_layer_inputs
        from .pruners import wanda_scores

        if metric not in ("kl", "ppl"):
            raise UserError(f"unknown search metric '{metric}': use kl or ppl")
        if not held_inputs:
            raise UserError("the search needs held-apart calibration windows (--search-windows "
                            "of at least 1)")
        self.model, self.metric, self.batch_size = model, metric, batch_size
        self.mats = scored_matrices(model)
        layers = decoder_layers(model)
        self.n_layers = len(layers)
        # a per-matrix candidate is flat in type-major order (per_matrix.flatten)
        types = list(dict.fromkeys(m.matrix for m in self.mats))
        self.flat_index = {m.name: types.index(m.matrix) * self.n_layers + m.layer
                           for m in self.mats}
        reference_targets = self._targets(reference)
        self.dense = {m.name: m.weight.detach().float().clone() for m in self.mats}
        self.ranks: dict[str, torch.Tensor] = {}
        self.applied = {m.name: 0.0 for m in self.mats}
        per_layer: dict[int, list] = {}
        for m in self.mats:
            per_layer.setdefault(m.layer, []).append(m)
        device = next(model.parameters()).device
        self.held = [torch.tensor(held_inputs[b:b + batch_size], dtype=torch.long, device=device)
                     for b in range(0, len(held_inputs), batch_size)]
        with torch.no_grad():
            self.dense_logp = [self._logp(ids) for ids in self.held] if metric == "kl" else None
            inputs = capture_layer_inputs(model, calib_inputs, batch_size)
            from tqdm.auto import tqdm

            for i in tqdm(range(len(layers)), desc="search: reference pass", unit="layer",
                          disable=not progress):
                sums: dict[str, torch.Tensor] = {}

                def hook(name):
                    def fn(module, args, output):
                        x = args[0].detach()
                        x = x.reshape(-1, x.shape[-1]).double()
                        sums[name] = sums.get(name, 0) + (x ** 2).sum(0)
                    return fn

                handles = [m.module.register_forward_hook(hook(m.name)) for m in per_layer[i]]
                try:
                    for b, hs in enumerate(inputs.hidden):
                        inputs.call(layers[i], i, b, hs)
                finally:
                    for h in handles:
                        h.remove()
                for m in per_layer[i]:
                    scores = wanda_scores(self.dense[m.name], sums[m.name])
                    order = torch.sort(scores, dim=1, stable=True).indices
                    cols = scores.shape[1]
                    rank = torch.empty_like(order)
                    positions = torch.arange(cols, device=order.device).expand_as(order)
                    rank.scatter_(1, order, positions)
                    self.ranks[m.name] = rank.to(torch.int16 if cols < 32768 else torch.int32)
                    self._apply_matrix(m, reference_targets[m.name])
                if i + 1 < len(layers):
                    inputs.hidden = [inputs.call(layers[i], i, b, hs)
                                     for b, hs in enumerate(inputs.hidden)]
            del inputs
        self.per_layer = per_layer

    def _logp(self, ids):
        import torch

        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    def _targets(self, sparsities: Sequence[float]) -> dict[str, float]:
        """Each matrix's sparsity: one value per layer (S_i for all its matrices), or one per
        scored matrix in type-major order (a per-matrix candidate)."""
        if len(sparsities) == self.n_layers:
            return {m.name: float(sparsities[m.layer]) for m in self.mats}
        if len(sparsities) == len(self.mats):
            return {m.name: float(sparsities[self.flat_index[m.name]]) for m in self.mats}
        raise UserError(f"{len(sparsities)} sparsities for {self.n_layers} layers and "
                        f"{len(self.mats)} scored matrices; give one per layer or per matrix")

    def _apply_matrix(self, m, sparsity: float) -> None:
        w = self.dense[m.name]
        k = _prune_count(w.shape[1], sparsity)
        new = w.masked_fill(self.ranks[m.name] < k, 0.0) if k else w
        target = m.module.weight
        target.data.copy_((new.t() if m.transposed else new).to(target.dtype))
        self.applied[m.name] = sparsity

    def apply(self, sparsities: Sequence[float]) -> None:
        """Set the model's weights to the masks of ``sparsities`` (changed matrices only)."""
        targets = self._targets(sparsities)
        for m in self.mats:
            if targets[m.name] != self.applied[m.name]:
                self._apply_matrix(m, targets[m.name])

    def restore(self) -> None:
        for m in self.mats:
            w = self.dense[m.name]
            m.module.weight.data.copy_((w.t() if m.transposed else w).to(m.module.weight.dtype))
        self.applied = {m.name: 0.0 for m in self.mats}

    def __call__(self, sparsities: Sequence[float]) -> float:
        import torch

        self.apply(sparsities)
        total, count = 0.0, 0
        with torch.no_grad():
            for b, ids in enumerate(self.held):
                logp = self._logp(ids)
                if self.metric == "kl":
                    ref = self.dense_logp[b]
                    kl = (ref.exp() * (ref - logp)).sum(-1)
                    total += float(kl.double().sum())
                    count += kl.numel()
                else:
                    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                    total += float(nll.double().sum())
                    count += nll.numel()
        mean = total / count
        return mean if self.metric == "kl" else math.exp(mean)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def split_held(samples, held: int):
    """(pruning windows, held-apart windows) of a calibration draw made ``held`` windows
    longer: its last ``held`` windows (c4: other documents than the pruning ones) score an
    allocator's candidates and never calibrate the pruning. (samples, None) when held is 0."""
    from dataclasses import replace

    if not held or samples is None:
        return samples, None
    n = len(samples.sequences) - held
    return (replace(samples, sequences=samples.sequences[:n], indices=samples.indices[:n]),
            replace(samples, sequences=samples.sequences[n:], indices=samples.indices[n:]))


# --------------------------------------------------------------------------- the allocator


# the options of search and search-matrix (the same start formula and the same search)
SEARCH_OPTIONS = (
    Option("alpha", 2.0, "activation: sigmoid shift (2)"),
    Option("beta", 0.2, "activation: spread (0.2)"),
    Option("search_budget", DEFAULT_BUDGET, "search: scored candidates (64: about 10 min of "
           "one core for SmolLM2)"),
    Option("search_step", DEFAULT_STEP, "search: sparsity one pair move shifts (0.02)"),
    Option("search_seed", 0, "search: seed of the moves (0)"),
    HELD_OPTION)


@register_allocator("search", needs=("counts", "model", "calibration", "held"),
                    options=SEARCH_OPTIONS)
def search_allocation(sparsity, *, model=None, calib_inputs=None, held_inputs=None,
                      counts=None, layer_sizes=None, alpha: float = 2.0, beta: float = 0.2,
                      search_budget: float = DEFAULT_BUDGET,
                      search_step: float = DEFAULT_STEP, search_seed: float = 0,
                      search: SearchSettings | None = None, search_metric: str = "kl",
                      search_state: str | Path | None = None, batch_size: int = 8,
                      progress: bool = False, info: dict | None = None, log=None,
                      **kw) -> list[float]:
    """``search``: the activation allocation (``counts``, alpha, beta; weighted mean S) improved
    by ``evolve`` with a ``MaskScorer`` at that start on ``held_inputs``."""
    from .allocation import activation_formula, fix_mean

    if counts is None:
        raise UserError("the search allocation starts from the activation allocation and needs "
                        "activated-weight counts: give --profile RUN or --model")
    settings = _settings(model, calib_inputs, held_inputs, search, search_budget, search_step,
                         search_seed, "search")
    start = fix_mean(activation_formula(counts, sparsity, alpha, beta), sparsity, layer_sizes,
                     cap=settings.hi)
    result = _run_search(model, calib_inputs, held_inputs, start, layer_sizes, settings,
                         search_metric, search_state, batch_size, progress, info, log)
    return result.sparsities


@register_allocator("search-matrix", needs=("counts", "model", "calibration", "held"),
                    per_matrix=True, options=SEARCH_OPTIONS)
def search_matrix_allocation(sparsity, *, model=None, calib_inputs=None, held_inputs=None,
                             matrix_counts=None, matrix_sizes=None, alpha: float = 2.0,
                             beta: float = 0.2, search_budget: float = DEFAULT_BUDGET,
                             search_step: float = DEFAULT_STEP, search_seed: float = 0,
                             search: SearchSettings | None = None, search_metric: str = "kl",
                             search_state: str | Path | None = None, batch_size: int = 8,
                             progress: bool = False, info: dict | None = None, log=None,
                             **kw) -> dict[str, list[float]]:
    """``search-matrix``: the same search over one sparsity per scored matrix, started from
    the ``activation-matrix`` allocation; a pair move trades sparsity between two matrices
    (weights: their sizes), so the size-weighted mean over all matrices stays S."""
    if not matrix_counts or not matrix_sizes:
        raise UserError("the search-matrix allocation starts from the activation-matrix "
                        "allocation and needs counts per matrix: give --profile RUN or --model")
    settings = _settings(model, calib_inputs, held_inputs, search, search_budget, search_step,
                         search_seed, "search-matrix")
    start = fix_matrix_mean(activation_matrix_formula(matrix_counts, matrix_sizes, sparsity,
                                                      alpha, beta),
                            sparsity, matrix_sizes, cap=settings.hi)
    from .per_matrix import model_matrix_sizes

    order = list(model_matrix_sizes(model))  # MaskScorer's type-major order: the model's
    if set(order) != set(start.per_matrix):
        raise UserError(f"counts for matrix types {sorted(start.per_matrix)} but the model "
                        f"scores {sorted(order)}; profile this model")
    values = {t: start.per_matrix[t] for t in order}
    result = _run_search(model, calib_inputs, held_inputs, flatten(values),
                         flatten({t: matrix_sizes[t] for t in order}), settings, search_metric,
                         search_state, batch_size, progress, info, log)
    return unflatten(result.sparsities, values)


def _settings(model, calib_inputs, held_inputs, search, budget, step, seed,
              name) -> SearchSettings:
    if model is None or calib_inputs is None or not held_inputs:
        raise UserError(f"the {name} allocation needs the model, calibration data and "
                        "held-apart calibration windows: give --model and --calibration")
    return search or SearchSettings(budget=int(round(budget)), step=float(step),
                                    seed=int(round(seed)))


def _run_search(model, calib_inputs, held_inputs, start, weights, settings, metric, state,
                batch_size, progress, info, log) -> SearchResult:
    """``evolve`` from ``start`` (one value per layer, or per matrix in type-major order) with
    a ``MaskScorer`` built at that start; its record goes into ``info``."""
    begin = time.perf_counter()
    with MaskScorer(model, calib_inputs, held_inputs, start, metric=metric,
                    batch_size=batch_size, progress=progress) as scorer:
        setup = time.perf_counter() - begin
        result = evolve(start, scorer, weights, settings, state, log)
    if info is not None:
        info.update(search={**asdict(settings), "metric": metric,
                            "held_windows": len(held_inputs), "start": list(start),
                            "start_score": result.start_score, "score": result.score,
                            "evaluations": result.evaluations,
                            "generations": result.generations,
                            "setup_seconds": round(setup, 3), "search_seconds": result.seconds,
                            "history": result.history})
    return result
