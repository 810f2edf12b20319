"""Every allocator actpat ships, in one registry, and running one by name.

``sparsity.allocation`` defines the registry (``ALLOCATORS``, ``register_allocator``) and the
paper's allocators (uniform, activation, OWL, AlphaPruning); ``allocators_2025`` (ATP, DLP) and
``allocation_search`` (search, search-matrix) and ``per_matrix`` (activation-matrix) register
theirs into it. This module imports them all, so that
``ALLOCATORS`` here is complete, and adds what runs an allocator: ``allocate`` (S_i from plain
inputs) and ``allocation_with_record`` (S_i plus the record ``actpat allocate --json`` writes,
loading counts from a profile when the allocator needs them). Callers import from here.
"""

from __future__ import annotations

from ..errors import UserError
from . import allocation_search, allocators_2025  # noqa: F401  (they register themselves)
from .allocation import ALLOCATORS, fix_mean, model_layer_sizes
from .masks import validate_sparsity
from .per_matrix import fix_matrix_mean, model_matrix_sizes

__all__ = ["ALLOCATORS", "activation_counts", "allocate", "allocation_with_record",
           "check_profile"]


def allocate(method: str, sparsity: float, *, counts=None, layer_sizes: list[int] | None = None,
             model=None, calib_inputs=None, matrix_counts=None, matrix_sizes=None,
             **kw) -> list[float]:
    """S_i per decoder layer for target ``sparsity`` by the allocator ``method``.

    A per-matrix allocator (``activation-matrix``, ``search-matrix``) returns a
    ``MatrixSparsities``: the S_i list plus one sparsity per scored matrix (``per_matrix``);
    ``matrix_counts`` / ``matrix_sizes`` (``{type: [per layer]}``) come from ``counts`` (a
    ``Counts``) or ``model`` when not given.

    ``counts``: the activated-weight counts N_i (``activation``): a list, or the ``Counts`` of
    ``activation.profiling.counts`` (its ``scored_per_layer`` then gives the layer sizes).
    ``layer_sizes``: scored weights per layer (taken from ``model`` when omitted and a model is
    given). ``model`` and ``calib_inputs`` (equal-length token sequences): needed by ``owl`` (and
    ``model`` by ``alphapruning``). Extra keywords are the allocator's options (``alpha``,
    ``beta``, ``owl_m``, ``owl_lambda``, ``eps``) or ``batch_size``, ``progress``, ``num_layers``.
    """
    entry = ALLOCATORS.get(method)
    sparsity = validate_sparsity(sparsity)
    if hasattr(counts, "layer_counts"):
        layer_sizes = layer_sizes or counts.scored_per_layer
        matrix_counts = matrix_counts or counts.matrix_counts
        matrix_sizes = matrix_sizes or counts.scored_per_matrix or None
        counts = counts.layer_counts
    if layer_sizes is None and model is not None:
        layer_sizes = model_layer_sizes(model)
    if entry.per_matrix and matrix_sizes is None and model is not None:
        matrix_sizes = model_matrix_sizes(model)
    options = {o.name: kw.pop(o.name, o.default) for o in entry.options}
    out = entry.fn(sparsity, counts=counts, layer_sizes=layer_sizes, model=model,
                   calib_inputs=calib_inputs, matrix_counts=matrix_counts,
                   matrix_sizes=matrix_sizes, **options, **kw)
    if entry.per_matrix:
        if not matrix_sizes:
            raise UserError(f"the {method} allocation needs the size of every scored matrix: "
                            "give --model, or a profile made by this version")
        return fix_matrix_mean(out, sparsity, matrix_sizes)
    return fix_mean(out, sparsity, layer_sizes)


def check_profile(profile, lm) -> None:
    """UserError unless ``profile`` was computed on ``lm``'s weights (identity and modules)."""
    from ..models.architectures import scored_matrices

    theirs = profile.meta.get("model") or {}
    ours = lm.identity or {}
    if theirs.get("sha256") and ours.get("sha256"):
        same = theirs["sha256"] == ours["sha256"]
    elif theirs.get("path") and ours.get("path"):
        same = str(theirs["path"]).rstrip("/") == str(ours["path"]).rstrip("/")
    else:
        same = True  # nothing recorded to compare: fall back to the module check
    shapes = {m.name: tuple(m.module.weight.shape) for m in scored_matrices(lm.model)}
    theirs_shapes = {k: tuple(v.shape) for k, v in profile.maps.items()}
    if not same or shapes != theirs_shapes:
        raise UserError(f"the profile was computed on model '{theirs.get('spec', '?')}', not on "
                        f"'{ours.get('spec', '?')}' (different weights or modules); profile this "
                        "model with `actpat profile` or drop --profile")


def activation_counts(*, profile_dir=None, lm=None, calib_sequences=None, gamma=None,
                      gamma_quantile=None, batch_size: int = 4, progress: bool = False,
                      meta: dict | None = None):
    """The N_i for the ``activation`` allocator: from a saved profile (checked against ``lm``
    when given) or by profiling ``calib_sequences`` on ``lm`` now. gamma defaults to the
    0.1 quantile (10% of all scored weights count as activated). Returns (Counts, info)."""
    from ..activation.profiling import Profile, compute_profile, counts

    if gamma is None and gamma_quantile is None:
        gamma_quantile = 0.1
    if profile_dir is not None:
        profile = Profile.load(profile_dir)
        if lm is not None:
            check_profile(profile, lm)
        source = {"profile": str(profile_dir), "dataset": profile.meta.get("dataset"),
                  "samples": profile.meta.get("samples")}
    else:
        if lm is None or calib_sequences is None:
            raise UserError("the activation allocation needs counts: give --profile RUN, or "
                            "--model (the calibration data is then profiled)")
        profile = compute_profile(lm, calib_sequences, batch_size, meta=meta, progress=progress)
        source = {"profile": "computed on the calibration data", "samples": len(calib_sequences)}
    c = counts(profile, gamma, gamma_quantile)
    source.update(gamma=c.gamma, gamma_rule=c.gamma_rule, counts=c.layer_counts)
    return c, source


def allocation_with_record(method: str, sparsity: float, *, lm=None, calib_sequences=None,
                           profile_dir=None, gamma=None, gamma_quantile=None,
                           options: dict | None = None, profile_samples: int = 64,
                           batch_size: int = 8, progress: bool = False, held_sequences=None,
                           state_path=None) -> tuple[list[float], dict]:
    """(S_i, the record ``actpat allocate --json`` writes) for allocator ``method``.

    ``lm``: the loaded model when at hand; ``calib_sequences``: calibration windows (the first
    ``profile_samples`` are profiled for counts when no ``profile_dir`` is given); ``options``:
    the allocator's options (defaults for the missing ones); ``held_sequences``: held-apart
    calibration windows (allocators that need ``"held"``); ``state_path``: where a resumable
    allocator (``search``) keeps its state. The allocator may add what it chose to the record.
    """
    entry = ALLOCATORS.get(method)
    sparsity = validate_sparsity(sparsity)
    options = options or {}
    kw = {o.name: options.get(o.name, o.default) for o in entry.options}
    info = {"method": method, "sparsity": sparsity, **kw}
    if "counts" in entry.needs:
        seqs = None if calib_sequences is None else calib_sequences[:profile_samples]
        c, src = activation_counts(profile_dir=profile_dir, lm=lm, calib_sequences=seqs,
                                   gamma=gamma, gamma_quantile=gamma_quantile, progress=progress)
        info["counts"] = src
        kw.update(counts=c.layer_counts, layer_sizes=c.scored_per_layer,
                  matrix_counts=c.matrix_counts, matrix_sizes=c.scored_per_matrix or None)
    if "calibration" in entry.needs:
        kw.update(batch_size=batch_size, progress=progress)
    if "held" in entry.needs:
        if not held_sequences:
            raise UserError(f"the {method} allocation needs held-apart calibration windows: "
                            "give --held-windows of at least 1")
        kw.update(held_inputs=held_sequences, search_state=state_path)
    if entry.needs & {"model", "calibration"} and lm is None:
        raise UserError(f"the {method} allocation needs the model: give --model")
    if not entry.needs and lm is None and profile_dir is None:
        raise UserError(f"the {method} allocation needs the layer count: give --model or "
                        "--profile")
    if not entry.needs and lm is None:
        from ..activation.profiling import Profile

        kw["num_layers"] = Profile.load(profile_dir).num_layers
    s = allocate(method, sparsity, model=None if lm is None else lm.model,
                 calib_inputs=calib_sequences, info=info, **kw)
    info["layer_sparsities"] = s
    if hasattr(s, "per_matrix"):
        info["matrix_sparsities"] = s.per_matrix
    return s, info
