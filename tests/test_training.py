"""Training: a complete run directory, real learning, two phases, and surviving SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from cxrfusion.cli import main
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.split import read_split, write_split
from cxrfusion.evaluation.calibration import apply_temperature, fit_temperature, nll
from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate
from cxrfusion.evaluation.predictions import predict_logits
from cxrfusion.inference.runs import load_run
from cxrfusion.labels import LABELS
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import best_epoch, train

PHANTOM_SIZE = 64  # the side of the phantoms and cache made by conftest.py

QUICK = dict(
    cache_size=PHANTOM_SIZE, input_size=PHANTOM_SIZE, weights="none", workers=0, batch_size=32
)
# The report's CNN has no normalisation layer: batch 8 gives Adam four times the steps per epoch
# of batch 32, which gets it off the label-prior plateau in a few epochs (~80 s on 2 cores).
LEARN = dict(
    **(QUICK | dict(batch_size=8)), epochs=12, lr=3e-3, plateau_patience=20, early_stop_patience=20
)
RUN_FILES = (
    "config.yaml",
    "split.csv",
    "environment.yaml",
    "metrics.csv",
    "loss_curves.png",
    "best.ckpt",
    "last.ckpt",
)


@pytest.fixture(scope="module")
def simple_cnn_run(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "simple_cnn"
    train(TrainConfig(prepared=str(prepared), out=str(out), model="simple_cnn", **LEARN))
    return out


def test_simple_cnn_learns_the_phantoms(simple_cnn_run):
    history = pd.read_csv(simple_cnn_run / "metrics.csv")
    assert best_epoch(simple_cnn_run)[1] >= 0.85, history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[1]


def test_a_run_directory_holds_everything_to_reproduce_and_reload_it(simple_cnn_run, prepared):
    for name in RUN_FILES:
        assert (simple_cnn_run / name).exists(), name
    config = yaml.safe_load((simple_cnn_run / "config.yaml").read_text())
    assert config["model"] == "simple_cnn" and config["epochs"] == LEARN["epochs"]
    assert (simple_cnn_run / "split.csv").read_bytes() == (prepared / "split.csv").read_bytes()
    metrics = pd.read_csv(simple_cnn_run / "metrics.csv")
    for column in ("epoch", "train_loss", "val_loss", "lr", "val_auc_macro"):
        assert column in metrics, column
    assert all(f"val_auc/{label}" in metrics for label in LABELS)
    assert metrics["epoch"].tolist() == list(range(len(metrics)))
    model, loaded = load_run(simple_cnn_run)
    assert loaded.model == "simple_cnn" and not model.training


def test_shuffled_labels_leave_the_model_at_chance(prepared, tmp_path):
    split = read_split(prepared / "split.csv")
    labels = split[list(LABELS)].sample(frac=1.0, random_state=0).to_numpy()
    split[list(LABELS)] = labels  # every image now carries another patient's findings
    shuffled = tmp_path / "shuffled"
    write_split(split, shuffled)
    for name in prepared.glob("images_*"):
        (shuffled / name.name).symlink_to(name)
    out = tmp_path / "run"
    train(TrainConfig(prepared=str(shuffled), out=str(out), model="simple_cnn", **LEARN))
    # The mean over epochs: a leak from labels to inputs would lift every epoch, noise does not.
    mean_auc = pd.read_csv(out / "metrics.csv")["val_auc_macro"].mean()
    assert abs(mean_auc - 0.5) < 0.06


def test_phase_one_trains_the_head_only_then_phase_two_everything(prepared, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        prepared=str(prepared),
        out=str(out),
        model="test_efficientnet",
        epochs=2,
        phase1_epochs=1,
        phase2_lr=3e-5,
        limit_train_batches=3,
        **QUICK,
    )
    train(config)
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["phase"].tolist() == [1, 2]
    assert metrics["lr"].tolist()[1] == pytest.approx(3e-5)
    checkpoints = [torch.load(out / f"{n}.ckpt", weights_only=False) for n in ("best", "last")]
    assert all(c["optimizer_states"] for c in checkpoints)


def test_an_existing_run_is_not_overwritten(simple_cnn_run, prepared, capsys):
    code = main(["train", "--prepared", str(prepared), "--out", str(simple_cnn_run)])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_sigkill_mid_epoch_then_resume_finishes_a_loadable_run(prepared, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "cxrfusion.cli", "train", "--prepared", str(prepared),
        "--out", str(out), "--model", "simple_cnn", "--epochs", "4", "--weights", "none",
        "--cache-size", str(PHANTOM_SIZE), "--input-size", str(PHANTOM_SIZE), "--workers", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "last.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    time.sleep(1.0)  # well into the next epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    epochs_before = len(pd.read_csv(out / "metrics.csv"))
    assert epochs_before < 4

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "best validation macro AUC" in resumed.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2, 3]
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(out / name, weights_only=False)["state_dict"]
    assert not list(out.glob(".*.tmp"))  # no half-written checkpoint left behind
    load_run(out)


def test_training_on_real_nih_images_writes_a_complete_run(nih_sample, tmp_path):
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--data", str(nih_sample), "--out", str(prepared), "--size", "64",
                 "--patient-fraction", "1.0", "--workers", "2"]) == 0  # fmt: skip
    out = tmp_path / "run"
    train(TrainConfig(prepared=str(prepared), out=str(out), model="simple_cnn", epochs=2, **QUICK))
    for name in RUN_FILES:
        assert (out / name).exists(), name
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    load_run(out)


def test_evaluate_a_trained_run_end_to_end(simple_cnn_run):
    """On the trained phantom model: predictions, AUCs equal to sklearn's, figures, report."""
    code = main(["evaluate", "--run", str(simple_cnn_run), "--bootstrap", "200",
                 "--temperature-scale", "--mc-samples", "5"])  # fmt: skip
    assert code == 0
    out = simple_cnn_run / "eval_test"
    for name in ("predictions.csv", "metrics.json", "report.html", "report.md", "roc_curves.png",
                 "reliability.png", "referral_curve.png", "mc_histogram.png",
                 "prediction_grid.png"):  # fmt: skip
        assert (out / name).exists(), name
    predictions = pd.read_csv(out / "predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    for label in LABELS:
        truth = predictions[f"true_{label}"]
        expected = (
            roc_auc_score(truth, predictions[label]) if 0 < truth.sum() < len(truth) else None
        )
        got = metrics["auc"]["classes"][label]["auc"]
        assert got == pytest.approx(expected, abs=1e-9) if expected is not None else got is None
    assert set(metrics["temperature"]) == set(LABELS)
    assert list(out.glob("gradcam_*.png"))


def test_temperature_scaling_does_not_worsen_validation_nll_of_a_trained_model(simple_cnn_run):
    model, config = load_run(simple_cnn_run)
    val = split_datasets(
        Path(config.prepared), config.cache_size, config.input_size,
        split_file=simple_cnn_run / "split.csv",
    )["val"]  # fmt: skip
    logits, targets = predict_logits(model.model, val), val.targets.numpy()
    temperature = fit_temperature(logits, targets)
    before = nll(targets, apply_temperature(logits, 1.0))
    after = nll(targets, apply_temperature(logits, temperature))
    assert after <= before + 1e-12
    assert (temperature != 1.0).any()  # a fit happened: the model is not already calibrated


def test_referring_the_most_uncertain_images_raises_the_retained_auc(mc_dropout_run):
    out = evaluate(mc_dropout_run, options=EvaluateOptions(bootstrap=100, examples=1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uncertainty"]["mean_uncertainty"] > 0  # the head's dropout does sample
    curve = metrics["referral"]["macro_auc"]
    assert curve[-1] > curve[0], curve  # half the images referred vs none
    assert sum(curve[1:]) / len(curve[1:]) > curve[0], curve
