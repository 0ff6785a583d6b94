"""Specifications for conformal decisions in the API and `predict`: a calibrated run's predictions
carry `apply_calibration`'s decisions on the unscaled MC-dropout means, and an uncalibrated run's
carry nothing of the kind."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from cxrfusion import Classifier
from cxrfusion.cli import main
from cxrfusion.labels import LABELS
from cxrfusion.stats.conformal import apply_calibration, load_calibration, save_calibration
from cxrfusion.stats.temperature import write_temperature
from cxrfusion.stats.uncertainty import summarise_samples

MC_SAMPLES = 5
N_IMAGES = 24


@pytest.fixture(scope="module")
def images(phantoms: Path) -> list[Path]:
    return sorted(phantoms.rglob("*.png"))[:N_IMAGES]


@pytest.fixture(scope="module")
def calibrated_run(mc_dropout_run: Path, images: list[Path], tmp_path_factory) -> Path:
    """A copy of the shared phantom run, calibrated by `cxrfusion calibrate` and given
    temperatures (so that scaled and unscaled means differ). The thresholds are then moved to
    the medians of these images' own unscaled scores, so that some of them are positive and some
    referred, and some not, whatever the trained model (a fitted calibration on a small run may
    refer nothing)."""
    run = tmp_path_factory.mktemp("calibrated_api") / "run"
    shutil.copytree(mc_dropout_run, run, ignore=shutil.ignore_patterns("last.ckpt", "eval_*"))
    argv = ["calibrate", "--run", str(run), "--alpha", "0.2", "--referral-alpha", "0.02"]
    assert main([*argv, "--mc-samples", str(MC_SAMPLES)]) == 0
    unscaled = Classifier.load(run, device="cpu", mc_samples=MC_SAMPLES).predict_many(
        images, batch_size=8
    )
    means = np.stack([p.probability for p in unscaled])
    uncertainty = np.array([p.uncertainty for p in unscaled])
    fitted = load_calibration(run)
    save_calibration(
        dataclasses.replace(
            fitted,
            thresholds=dict(zip(LABELS, np.median(means, axis=0).tolist(), strict=True)),
            referral_threshold=float(np.median(uncertainty)),
        ),
        run,
    )
    write_temperature(run, np.linspace(0.5, 2.0, len(LABELS)), {"split": "val"})
    return run


def test_predictions_carry_apply_calibration_on_the_unscaled_means(
    calibrated_run: Path, images: list[Path]
) -> None:
    classifier = Classifier.load(calibrated_run, device="cpu", mc_samples=MC_SAMPLES)
    predictions = classifier.predict_many(images, batch_size=8)
    calibration = load_calibration(calibrated_run)
    batches = [images[i : i + 8] for i in range(0, len(images), 8)]
    logits = np.concatenate(
        [
            classifier.engine.sample_logits(
                classifier.model_input(np.stack([classifier.prepare(p).image for p in batch])),
                MC_SAMPLES,
                classifier.seed + index,
            )
            for index, batch in enumerate(batches)
        ],
        axis=1,
    ).astype(np.float64)
    unscaled = summarise_samples(expit(logits))
    positive, referred = apply_calibration(unscaled["mean"], unscaled["uncertainty"], calibration)
    assert not np.allclose(unscaled["mean"], np.stack([p.probability for p in predictions]))
    np.testing.assert_array_equal(np.stack([p.positive for p in predictions]), positive)
    np.testing.assert_array_equal([p.referred for p in predictions], referred)
    assert positive.any() and not positive.all() and referred.any() and not referred.all()

    first = predictions[0].to_dict()["conformal"]
    assert first["alpha"] == 0.2 and first["referral_alpha"] == calibration.referral_alpha
    assert first["positive"] == [label for label, p in zip(LABELS, positive[0], strict=True) if p]
    assert first["referred"] == bool(referred[0]) and "false-negative rate" in first["bound"]
    frame = predictions.to_frame()
    np.testing.assert_array_equal(frame[[f"positive_{x}" for x in LABELS]].to_numpy(), positive)
    np.testing.assert_array_equal(frame["referred"].to_numpy(), referred.astype(int))
    assert classifier.card()["conformal"]["thresholds"] == calibration.thresholds


def test_a_sample_count_other_than_the_calibrated_one_is_warned_about(
    calibrated_run: Path, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="cxrfusion.inference.classifier"):
        Classifier.load(calibrated_run, device="cpu", mc_samples=MC_SAMPLES)
        assert not caplog.records
        Classifier.load(calibrated_run, device="cpu", mc_samples=MC_SAMPLES + 1)
    assert "fitted with 5 MC-dropout samples" in caplog.text


def test_predict_writes_the_decisions_and_counts_the_referred(
    calibrated_run: Path, images: list[Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "preds"
    argv = ["predict", "--run", str(calibrated_run), *map(str, images[:6]), "--out", str(out)]
    assert main([*argv, "--mc-samples", str(MC_SAMPLES)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    document = json.loads((out / "predictions.json").read_text())
    referred = [p["conformal"]["referred"] for p in document["predictions"]]
    assert table["referred"].tolist() == [int(r) for r in referred]
    for row, entry in zip(table.itertuples(), document["predictions"], strict=True):
        marked = [x for x in LABELS if getattr(row, f"positive_{x}") == 1]
        assert marked == entry["conformal"]["positive"]
    assert document["conformal"]["alpha"] == 0.2
    assert f"{sum(referred)} referred under the conformal guarantee" in capsys.readouterr().out


def test_an_uncalibrated_run_reports_no_conformal_fields(
    mc_dropout_run: Path, images: list[Path]
) -> None:
    classifier = Classifier.load(mc_dropout_run, device="cpu", mc_samples=2)
    predictions = classifier.predict_many(images[:2])
    assert "conformal" not in predictions[0].to_dict() and "conformal" not in classifier.card()
    columns = predictions.to_frame().columns
    assert "referred" not in columns and not any(c.startswith("positive_") for c in columns)


def test_an_onnx_export_carries_the_calibration(
    calibrated_run: Path, images: list[Path], tmp_path: Path
) -> None:
    from cxrfusion.inference.export import export_run

    export_run(calibrated_run, tmp_path / "export")
    classifier = Classifier.load(tmp_path / "export", engine="onnx", mc_samples=MC_SAMPLES)
    assert classifier.spec.calibration == load_calibration(calibrated_run)
    assert classifier.predict(images[0]).to_dict()["conformal"]["alpha"] == 0.2
