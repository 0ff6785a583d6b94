"""Shared test data: phantoms made by the project itself, and the real NIH sample when present."""

from pathlib import Path

import pytest

from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.data.synthetic import synthesize
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import train

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


@pytest.fixture(scope="session")
def mc_dropout_run(prepared, tmp_path_factory) -> Path:
    """A trained run shared by every module: timm's tiny `test_efficientnet` under the report's
    MC-dropout head (the simple CNN has no dropout), 8 epochs at 64 px from random init (~25 s)."""
    out = tmp_path_factory.mktemp("runs") / "mc_dropout"
    config = TrainConfig(
        prepared=str(prepared),
        out=str(out),
        model="test_efficientnet",
        epochs=8,
        phase1_epochs=0,  # random init: nothing pretrained to keep frozen
        lr=3e-3,
        cache_size=PHANTOM_SIZE,
        input_size=PHANTOM_SIZE,
        weights="none",
        workers=0,
        batch_size=32,
    )
    train(config)
    return out
