"""Unknown (NaN) labels are masked everywhere: the loss, AUC, calibration, training on merged
data and external validation, which scores only the findings the external data reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from source_layouts import write_chexpert, write_mimic, write_padchest
from torchvision.ops import sigmoid_focal_loss

from cxrfusion.cli import main
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.prepare import prepare
from cxrfusion.labels import LABELS
from cxrfusion.stats.calibration import expected_calibration_error
from cxrfusion.stats.metrics import bootstrap_auc_ci, macro_auc, per_class_auc
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import train
from cxrfusion.training.losses import create_loss

SIZE = 64


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 14, generator=generator)
    targets = (torch.rand(16, 14, generator=generator) < 0.3).float()
    targets[torch.rand(16, 14, generator=generator) < 0.4] = float("nan")
    return logits, targets


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("focal", lambda x, y: sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0, reduction="mean")),
        ("bce", F.binary_cross_entropy_with_logits),
    ],
)
def test_masked_loss_equals_the_loss_over_the_known_entries(name, reference):
    logits, targets = _batch()
    known = ~torch.isnan(targets)
    masked = create_loss(name)(logits, targets)
    torch.testing.assert_close(masked, reference(logits[known], targets[known]))
    full = targets.nan_to_num(0.0)
    torch.testing.assert_close(create_loss(name)(logits, full), reference(logits, full))


def test_an_unknown_label_gives_no_gradient():
    logits, targets = _batch(1)
    logits.requires_grad_(True)
    create_loss("focal")(logits, targets).backward()
    assert (logits.grad[torch.isnan(targets)] == 0).all()
    assert (logits.grad[~torch.isnan(targets)] != 0).any()


def test_asl_refuses_unknown_labels():
    with pytest.raises(ValueError, match="cannot mask"):
        create_loss("asl")(*_batch())


def test_auc_scores_each_class_on_its_known_labels_only():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    p = rng.random((200, 3)) + 0.5 * y
    y[rng.random((200, 3)) < 0.3] = np.nan
    y[:, 2] = np.nan  # a finding this data does not report
    aucs = per_class_auc(y, p)
    for c in range(2):
        known = ~np.isnan(y[:, c])
        assert aucs[c] == pytest.approx(per_class_auc(y[known, c : c + 1], p[known, c : c + 1])[0])
    assert np.isnan(aucs[2]) and macro_auc(aucs) == pytest.approx(aucs[:2].mean())
    ci = bootstrap_auc_ci(y, p, np.arange(200) // 2, n_resamples=50)
    assert ci["n_valid"][2] == 0 and ci["macro_n_valid"] == 50
    known = ~np.isnan(y[:, 0])
    assert expected_calibration_error(y[:, :1], np.clip(p[:, :1], 0, 1)) == pytest.approx(
        expected_calibration_error(y[known, :1], np.clip(p[known, :1], 0, 1))
    )


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    """A tiny model trained 1 epoch on CheXpert + MIMIC merged (NaN labels in training)."""
    root = tmp_path_factory.mktemp("merged")
    specs = [f"chexpert:{write_chexpert(root)}", f"mimic:{write_mimic(root / 'mimic')}"]
    prepare(specs, root / "prepared", PrepareOptions(patient_fraction=1.0, size=SIZE, val=0.2))
    config = TrainConfig(
        prepared=str(root / "prepared"),
        out=str(root / "run"),
        model="test_efficientnet",
        epochs=1,
        phase1_epochs=0,
        cache_size=SIZE,
        input_size=SIZE,
        weights="none",
        workers=0,
        batch_size=8,
    )
    train(config)
    return root


def test_training_on_merged_data_with_unknown_labels_works(merged_run):
    metrics = pd.read_csv(merged_run / "run" / "metrics.csv")
    assert np.isfinite(metrics["train_loss"].dropna()).all()
    assert np.isnan(metrics["val_auc/Hernia"]).all()  # neither source reports Hernia
    assert (merged_run / "run" / "best.ckpt").is_file()


def test_external_validation_scores_only_the_findings_the_data_reports(merged_run, capsys):
    external = merged_run / "padchest"
    prepare(
        f"padchest:{write_padchest(merged_run / 'padchest_raw', broken=False)}",
        external,
        PrepareOptions(patient_fraction=1.0, size=SIZE),
    )
    out = merged_run / "external"
    argv = ["evaluate", "--run", str(merged_run / "run"), "--prepared", str(external)]
    argv += ["--split", "all", "--mc-samples", "2", "--bootstrap", "20", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    truth = predictions[[f"true_{label}" for label in LABELS]].to_numpy(float)
    reported = [
        label
        for label, column in zip(LABELS, truth.T, strict=True)
        if (column == 1).any() and (column == 0).any()
    ]
    assert metrics["external"]["scored"] == reported
    assert metrics["external"]["shared_images"] == 0
    recomputed = per_class_auc(truth, predictions[list(LABELS)].to_numpy(float))
    for label, auc in zip(LABELS, recomputed, strict=True):
        expected = metrics["auc"]["classes"][label]["auc"]
        assert (expected is None and np.isnan(auc)) or expected == pytest.approx(auc)
    # The run's own data as "external": it says the images and patients are shared.
    again = [
        "evaluate",
        "--run",
        str(merged_run / "run"),
        "--prepared",
        str(merged_run / "prepared"),
    ]
    assert main([*again, "--mc-samples", "2", "--bootstrap", "20"]) == 0
    own = json.loads((merged_run / "run" / "external_prepared_test" / "metrics.json").read_text())
    assert own["external"]["shared_images"] > 0
    assert any("not independent" in note for note in own["notes"])
