"""The Python front door's implementations (``import actpat`` exposes them lazily).

Every function takes plain values and in-memory objects: a Hugging Face causal LM and its
tokenizer (or the handle of ``load_model`` with ``tokenizer=None``), lists of strings, numbers.
Nothing here knows the command line; the commands and these functions call the same library.
"""

from __future__ import annotations

from collections.abc import Sequence

from .models.loading import LoadedModel


def load_model(spec: str, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """A handle with ``.model`` and ``.tokenizer`` from an alias (``smollm2-135m``), a ``.gguf``
    file, a local directory or a hub id."""
    from .models.loading import load_model as _load

    return _load(spec, device, dtype, trust_remote_code)


def as_loaded(model, tokenizer=None) -> LoadedModel:
    """A ``LoadedModel`` for a handle or for any in-memory causal LM and its tokenizer."""
    from .errors import UserError
    from .models.architectures import get_adapter

    if isinstance(model, LoadedModel):
        if tokenizer is not None and tokenizer is not model.tokenizer:
            return LoadedModel(model.model, tokenizer, model.spec, model.identity)
        return model
    if tokenizer is None:
        raise UserError("give the tokenizer with an in-memory model (or a handle from "
                        "actpat.load_model)")
    get_adapter(model)  # an unknown architecture fails here, with how to add it
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    return LoadedModel(model, tokenizer, name, {"spec": name, "path": name, "in_memory": True})


def _texts(texts, what: str) -> list[str]:
    from .errors import UserError

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise UserError(f"{what} must be a non-empty list of strings")
    return list(texts)


def profile(model, tokenizer=None, texts: Sequence[str] = (), seq_len: int = 256,
            batch_size: int = 4, objective: str = "max-logit", progress: bool = False):
    """The mean activation map over ``texts`` (each cut to its first ``seq_len`` tokens):
    an ``activation.profiling.Profile`` (``.maps``, ``.layer_of``, ``.save(dir)``)."""
    from .activation.profiling import compute_profile
    from .data.datasets import encode_texts

    lm = as_loaded(model, tokenizer)
    sequences = encode_texts(lm.tokenizer, _texts(texts, "texts"), seq_len)
    meta = {"model": lm.identity, "dataset": "in-memory texts", "seq_len": seq_len,
            "samples_given": len(sequences)}
    return compute_profile(lm, sequences, batch_size, objective, meta, progress=progress)


def counts(profile, gamma: float | None = None, gamma_quantile: float | None = None):
    """Activated weights N_i at threshold gamma (or the gamma that leaves ``gamma_quantile`` of
    all weights above it; default 0.1): ``.layer_counts``, ``.matrix_counts``,
    ``.scored_per_layer``."""
    from .activation.profiling import counts as _counts

    if gamma is None and gamma_quantile is None:
        gamma_quantile = 0.1
    return _counts(profile, gamma, gamma_quantile)


def allocate(method: str, sparsity: float, counts=None, model=None, calibration_texts=None,
             tokenizer=None, seq_len: int = 256, **options) -> list[float]:
    """One sparsity S_i per decoder layer whose size-weighted mean is ``sparsity``.

    ``counts``: from ``actpat.counts`` (the ``activation`` allocator); ``model``: the weights
    (``owl``, ``alphapruning``; also gives the layer sizes); ``calibration_texts`` (with the
    tokenizer): OWL's calibration data. ``options``: the allocator's own (``alpha``, ``beta``,
    ``owl_m``, ``owl_lambda``, ``eps``).
    """
    from .sparsity.allocators import allocate as _allocate

    module = None
    calib = None
    if model is not None:
        module = model.model if isinstance(model, LoadedModel) else model
    if calibration_texts is not None:
        lm = as_loaded(model, tokenizer)
        calib = _windows(lm.tokenizer, calibration_texts, seq_len)
    return _allocate(method, sparsity, counts=counts, model=module, calib_inputs=calib, **options)


def _windows(tokenizer, texts, seq_len: int) -> list[list[int]]:
    from .data.calibration import text_windows

    return text_windows(tokenizer, _texts(texts, "calibration_texts"), seq_len)


def prune(model, tokenizer=None, calibration_texts: Sequence[str] | None = None,
          sparsity: float = 0.5, pruner: str = "wanda", allocation=None,
          pattern: str = "unstructured", seq_len: int = 256, counts=None,
          batch_size: int = 8, progress: bool = False) -> list[float]:
    """Prune ``model`` in place, layer by layer (the one sequential loop), and return the
    sparsity achieved in each decoder layer.

    ``calibration_texts``: joined and cut into windows of ``seq_len`` tokens (not needed by
    ``magnitude``). ``allocation``: None (uniform), an allocator name (``activation`` needs
    ``counts``), or one target sparsity per decoder layer.
    """
    from .errors import UserError
    from .models.architectures import decoder_layers
    from .sparsity.layerwise import prune_model
    from .sparsity.pruners import get_pruner

    lm = as_loaded(model, tokenizer)
    p = get_pruner(pruner)
    calib = None
    if calibration_texts is not None:
        calib = _windows(lm.tokenizer, calibration_texts, seq_len)
    elif p.stat is not None:
        raise UserError(f"pruner '{pruner}' needs calibration_texts")
    if allocation is None:
        allocation = "uniform"
    if isinstance(allocation, str):
        from .sparsity.allocators import allocate as _allocate

        sparsities = _allocate(allocation, sparsity, counts=counts, model=lm.model,
                               calib_inputs=calib, batch_size=batch_size)
    else:
        sparsities = [float(s) for s in allocation]
        if len(sparsities) != len(decoder_layers(lm.model)):
            raise UserError(f"allocation has {len(sparsities)} values for "
                            f"{len(decoder_layers(lm.model))} decoder layers; give one per layer")
    report = prune_model(lm.model, calib, sparsities, pruner, pattern, batch_size, progress)
    return [x["achieved"] for x in report["layers"]]


def perplexity(model, tokenizer=None, texts: Sequence[str] = (), seq_len: int = 256,
               batch_size: int = 4) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens of the joined ``texts``
    (BOS-led windows when the tokenizer adds BOS, as ``actpat eval`` does)."""
    from .evaluation.evaluate import perplexity as _perplexity, text_corpus

    lm = as_loaded(model, tokenizer)
    corpus = text_corpus(lm.tokenizer, "texts", "\n\n".join(_texts(texts, "texts")),
                         "in-memory texts")
    return float(_perplexity(lm.model, corpus, seq_len, batch_size=batch_size)["ppl"])


def similarity(model, tokenizer=None, pairs: Sequence[tuple[str, str]] = (), seq_len: int = 256,
               objective: str = "max-logit", pairs_per_batch: int = 2):
    """Activation-pattern similarity per layer of each text pair: an
    ``analysis.similarity.PairSimilarity`` (``.per_pair``: pairs x layers cosine)."""
    from .analysis.similarity import pair_similarity
    from .data.datasets import encode_texts

    lm = as_loaded(model, tokenizer)
    a = encode_texts(lm.tokenizer, _texts([p[0] for p in pairs], "pairs"), seq_len)
    b = encode_texts(lm.tokenizer, _texts([p[1] for p in pairs], "pairs"), seq_len)
    return pair_similarity(lm, list(zip(a, b)), pairs_per_batch, objective)


def sts(model, tokenizer=None, pairs: Sequence[tuple[str, str, float]] = (),
        max_tokens: int = 128, bootstrap: int = 1000, seed: int = 0,
        objective: str = "max-logit") -> dict:
    """Spearman rho per layer between pattern similarity and the human score of each
    ``(sentence_a, sentence_b, score)``; the dict ``sts.json`` holds."""
    import numpy as np

    from .analysis.sts import Pairs, run_sts

    lm = as_loaded(model, tokenizer)
    pairs = list(pairs)
    data = Pairs([p[0] for p in pairs], [p[1] for p in pairs],
                 np.asarray([float(p[2]) for p in pairs]), list(range(len(pairs))),
                 "in-memory pairs", "pairs", None, ("a", "b", "score"))
    return run_sts(lm, data, max_tokens, objective=objective, n_resamples=bootstrap, seed=seed,
                   progress=False)


def report(paths: Sequence[str], out: str, title: str = "actpat report") -> dict:
    """One self-contained HTML page for the run directories ``paths``."""
    from .outputs.report.page import write_report

    return write_report(list(paths), out, title)
