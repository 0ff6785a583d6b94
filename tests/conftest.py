"""Shared test data: phantoms made by the project itself, and the real NIH sample when present."""

from pathlib import Path

import pytest

from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.data.synthetic import synthesize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHANTOM_SIZE = 64  # test_training.py relies on this side


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """2,000 phantom radiographs in the NIH layout (made once per test session)."""
    return synthesize(
        tmp_path_factory.mktemp("phantoms"), n=2000, seed=0, size=PHANTOM_SIZE, workers=2
    )


@pytest.fixture(scope="session")
def prepared(phantoms, tmp_path_factory) -> Path:
    """The phantoms split by patient (all patients) and cached at 64 px."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(phantoms, out, PrepareOptions(patient_fraction=1.0, size=PHANTOM_SIZE))
    return out


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    folder = SHARED_DATA / "nih14-sample"
    if not folder.exists():
        pytest.skip(f"real NIH sample not found at {folder} (../shared is absent)")
    return folder
