import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny.py, reference.py

DATA_DIR = os.environ.get("ACTPAT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir():
    if not Path(DATA_DIR, "boolq").exists():
        pytest.skip(f"local data dir not found at {DATA_DIR}; set ACTPAT_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (float32, CPU), loaded once per test session."""
    from actpat.models.loading import load_model

    try:
        return load_model("smollm2-135m", device="cpu")
    except Exception as e:  # package missing: the tests that need the real model skip
        pytest.skip(f"SmolLM2 not available: {e}")
