"""The Hugging Face hub: one reachability probe per process, offline mode when nothing answers.

Left to itself, ``huggingface_hub`` retries an unreachable endpoint for most of a minute and
prints every retry, once per file. Before its first hub access actpat asks the endpoint once
(``HF_ENDPOINT``, 2 s timeout). When nothing answers, it switches ``huggingface_hub``,
``transformers`` and ``datasets`` to their offline mode for the rest of the process: a warm
cache still serves, and a cold one fails at once, which the callers turn into one line naming
``OFFLINE_FIX``.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

OFFLINE_FIX = ("give a local directory, a .gguf file, a local data file, or set "
               "HF_HUB_OFFLINE=1 with a warm cache")
_TRUE = ("1", "true", "yes", "on")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_forced() -> bool:
    """The user asked for offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ...)."""
    return any(os.environ.get(v, "").lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def _answers(url: str, timeout: float) -> bool:
    """Whether anything answers HTTP at ``url`` (any status counts: the host is there)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, no DNS, timeout, proxy failure, malformed URL
        return False
    return True


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub answers and offline mode is not forced; probed once per process."""
    return not offline_forced() and _answers(endpoint(), timeout)


def prepare_hub(timeout: float = 2.0) -> bool:
    """Call before touching the hub: probe it once; when it is unreachable, put the hub
    libraries in offline mode for this process (cache only, no retries). Returns reachability."""
    if hub_reachable(timeout):
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later and child processes
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:
        return False
    datasets.config.HF_HUB_OFFLINE = True
    return False
