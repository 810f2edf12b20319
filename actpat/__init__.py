"""actpat: activation patterns of parameters in language models.

Implements (and extends) Wang et al., "Exploring Activation Patterns of Parameters in
Language Models" (AAAI 2025). See README.md, docs/python-api.md and docs/architecture.md.

The front door (imported on first use, so ``import actpat`` stays fast)::

    handle = actpat.load_model("smollm2-135m")
    prof = actpat.profile(handle, None, texts, seq_len=128)
    n = actpat.counts(prof, gamma_quantile=0.1)
    s = actpat.allocate("activation", 0.5, counts=n, model=handle)
    achieved = actpat.prune(handle, None, calibration_texts, 0.5, allocation=s)
    ppl = actpat.perplexity(handle, None, held_out_texts)
"""

from .version import __version__

_API = ("load_model", "profile", "counts", "allocate", "prune", "perplexity", "similarity", "sts",
        "report", "as_loaded")
_NAMES = {"Registry": "actpat.registry", "UserError": "actpat.errors",
          "LoadedModel": "actpat.models.loading", "Profile": "actpat.activation.profiling"}

__all__ = ["__version__", *_API, *_NAMES]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module("actpat.api"), name)
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'actpat' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(__all__))
