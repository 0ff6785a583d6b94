"""Specification of the built-in synthetic NIH-style data (`cxrfusion.data.synthetic`)."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from cxrfusion.data import synthetic
from cxrfusion.data.phantoms import render_phantom
from cxrfusion.data.synthetic import TABLE_NAME, synthesize
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS, NO_FINDING, multi_hot

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / TABLE_NAME).open(newline="") as f:
        return list(csv.DictReader(f))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("small"), n=30, seed=3, size=64)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for label statistics; tiny pixels keep it fast."""
    return synthesize(tmp_path_factory.mktemp("large"), n=2000, seed=0, size=32, workers=2)


@pytest.fixture(scope="module")
def large_labels(large: Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    rows = _rows(large)
    return np.stack([multi_hot(row["Finding Labels"]) for row in rows]), rows


def test_table_header_is_the_nih_v2020_header_line(small: Path) -> None:
    first_line = (small / TABLE_NAME).read_bytes().split(b"\n", 1)[0]
    assert first_line.decode() == NIH_HEADER


def test_table_has_n_rows_of_eleven_fields(small: Path) -> None:
    with (small / TABLE_NAME).open(newline="") as f:
        records = list(csv.reader(f))[1:]
    assert len(records) == 30
    assert {len(record) for record in records} == {11}


def test_every_listed_image_exists_as_8_bit_grayscale_of_the_requested_size(small: Path) -> None:
    names = [row["Image Index"] for row in _rows(small)]
    assert all(re.fullmatch(r"\d{8}_\d{3}\.png", name) for name in names)
    assert sorted(p.name for p in (small / "images").iterdir()) == sorted(names)
    for name in names:
        with Image.open(small / "images" / name) as image:
            assert (image.mode, image.size) == ("L", (64, 64))


def test_images_are_not_blank(small: Path) -> None:
    pixels = np.asarray(Image.open(small / "images" / _rows(small)[0]["Image Index"]))
    assert pixels.std() > 20 and pixels.min() < 60 and pixels.max() > 180


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(
    small: Path, tmp_path: Path
) -> None:
    again = synthesize(tmp_path / "again", n=30, seed=3, size=64, workers=2)
    assert (again / TABLE_NAME).read_bytes() == (small / TABLE_NAME).read_bytes()
    for name in [row["Image Index"] for row in _rows(small)][::7]:
        assert _digest(again / "images" / name) == _digest(small / "images" / name)


def test_another_seed_gives_other_labels_and_pixels(small: Path, tmp_path: Path) -> None:
    other = synthesize(tmp_path / "other", n=30, seed=4, size=64)
    assert (other / TABLE_NAME).read_bytes() != (small / TABLE_NAME).read_bytes()
    name = _rows(small)[0]["Image Index"]  # both runs start with patient 1, follow-up 0
    assert _digest(other / "images" / name) != _digest(small / "images" / name)


def test_an_interrupted_run_leaves_no_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = synthesize(tmp_path / "rerun", n=10, seed=0, size=32)
    written = []

    def fail_on_the_fifth(task: tuple) -> None:
        if len(written) == 4:
            raise RuntimeError("interrupted")
        written.append(task)

    monkeypatch.setattr(synthetic, "_write_image", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthesize(out, n=10, seed=1, size=32)
    assert not (out / TABLE_NAME).exists()  # the old table would name images of another seed


@pytest.mark.parametrize("setting", [{"n": 0}, {"seed": -1}, {"size": 16}, {"workers": 0}])
def test_settings_out_of_range_are_refused_before_writing(tmp_path: Path, setting: dict) -> None:
    with pytest.raises(CxrError, match=next(iter(setting))):
        synthesize(tmp_path / "refused", **setting)
    assert not (tmp_path / "refused").exists()


def test_label_prevalence_follows_nih_order(large_labels: tuple) -> None:
    labels, _ = large_labels
    counts = dict(zip(LABELS, labels.sum(axis=0), strict=True))
    assert max(counts, key=counts.get) == "Infiltration"
    assert min(counts, key=counts.get) == "Hernia"
    assert counts["Effusion"] > counts["Nodule"] > counts["Pneumonia"]
    assert counts["Hernia"] >= 15  # enough for a per-class AUC on 2,000 images
    assert 0.4 < (labels.sum(axis=1) == 0).mean() < 0.6


def test_no_finding_rows_and_label_rows_are_encoded_as_nih_does(large_labels: tuple) -> None:
    labels, rows = large_labels
    for vector, row in zip(labels, rows, strict=True):
        findings = row["Finding Labels"]
        if findings == NO_FINDING:
            assert not vector.any()
        else:  # in LABELS order, never mixed with No Finding
            assert findings == "|".join(np.array(LABELS)[vector.astype(bool)])


def test_effusion_co_occurs_with_cardiomegaly_and_edema(large_labels: tuple) -> None:
    labels, _ = large_labels
    effusion = labels[:, LABELS.index("Effusion")].astype(bool)
    for partner in ("Cardiomegaly", "Edema"):
        with_partner = labels[:, LABELS.index(partner)].astype(bool)
        assert effusion[with_partner].mean() > 2 * effusion.mean()


def test_patients_have_several_follow_ups_with_persistent_findings(large_labels: tuple) -> None:
    labels, rows = large_labels
    patients = np.array([int(row["Patient ID"]) for row in rows])
    per_patient = np.bincount(patients)[1:]
    assert 2.0 < per_patient.mean() < 4.5 and per_patient.max() >= 5
    for row in rows:
        assert (
            row["Image Index"] == f"{int(row['Patient ID']):08d}_{int(row['Follow-up #']):03d}.png"
        )
    same_patient = patients[1:] == patients[:-1]
    agreement = (labels[1:] == labels[:-1]).all(axis=1)
    assert agreement[same_patient].mean() > agreement[~same_patient].mean() + 0.2


def test_demographics_are_plausible(large_labels: tuple) -> None:
    _, rows = large_labels
    ages = np.array([int(row["Patient Age"]) for row in rows])
    assert ages.min() > 0 and ages.max() < 100 and 35 < ages.mean() < 60
    assert {row["Patient Gender"] for row in rows} == {"M", "F"}
    assert {row["View Position"] for row in rows} == {"PA", "AP"}


@pytest.mark.parametrize("label", LABELS)
def test_every_sign_visibly_changes_a_64_px_phantom_and_nothing_else_does(label: str) -> None:
    for seed in range(4):
        normal = render_phantom([], seed=seed, size=64).astype(int)
        assert np.array_equal(render_phantom([], seed=seed, size=64), normal)
        changed = np.abs(render_phantom([label], seed=seed, size=64) - normal) > 15
        assert changed.sum() >= 4


def test_render_phantom_rejects_an_unknown_label() -> None:
    with pytest.raises(ValueError, match="Fracture"):
        render_phantom(["Fracture"], seed=0, size=64)


@pytest.fixture(scope="module")
def downsampled_phantoms() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """900 phantoms at 64 px, pooled to 32x32; each label present at random."""
    rng = np.random.default_rng(0)
    present = rng.random((900, len(LABELS))) < 0.1
    present[:, [LABELS.index("Cardiomegaly"), LABELS.index("Effusion")]] = (
        rng.random((900, 2)) < 0.5
    )
    pixels = [
        render_phantom(np.array(LABELS)[row], seed=1000 + i, size=64)
        .reshape(32, 2, 32, 2)
        .mean((1, 3))
        for i, row in enumerate(present)
    ]
    return np.stack(pixels).reshape(900, -1) / 255, dict(zip(LABELS, present.T, strict=True))


def _held_out_auc(pixels: np.ndarray, target: np.ndarray) -> float:
    """Logistic regression trained on the first 600 images, scored on the last 300."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=500))
    with threadpool_limits(1):  # BLAS threads on a busy small machine cost 10x here
        model.fit(pixels[:600], target[:600])
    return roc_auc_score(target[600:], model.decision_function(pixels[600:]))


@pytest.mark.parametrize("label", ["Cardiomegaly", "Effusion"])
def test_a_sign_is_learnable_from_32_px_while_shuffled_labels_are_not(
    downsampled_phantoms: tuple, label: str
) -> None:
    pixels, present = downsampled_phantoms
    assert _held_out_auc(pixels, present[label]) > 0.75
    shuffled = np.random.default_rng(1).permutation(present[label])
    assert _held_out_auc(pixels, shuffled) < 0.65
