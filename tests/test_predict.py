"""Specifications for `cxrfusion predict`: every readable image predicted, every bad one named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from realdata import prepare_real, split_images, train_tiny

from cxrfusion import Classifier
from cxrfusion.cli import main
from cxrfusion.labels import LABELS


@pytest.fixture(scope="module")
def run(nih_sample, tmp_path_factory) -> Path:
    prepared = prepare_real(nih_sample, tmp_path_factory.mktemp("real"), n=24)
    return train_tiny(prepared, prepared.parent / "run", "test_efficientnet")


@pytest.fixture
def folder(run, nih_sample, tmp_path) -> Path:
    """Real images in a folder and a subfolder, plus one corrupt PNG and one unrelated file."""
    images = split_images(run, nih_sample) + [nih_sample / "images" / "00000001_000.png"]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, image in enumerate(images[:4]):
        shutil.copy(image, tmp_path / "in" / ("sub" if i % 2 else "") / image.name)
    (tmp_path / "in" / "sub" / "broken.png").write_bytes(images[0].read_bytes()[:300])
    (tmp_path / "in" / "notes.txt").write_text("not an image, not looked at")
    return tmp_path / "in"


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_folder_with_one_corrupt_file_predicts_the_others_and_exits_2(
    run, folder, tmp_path, capsys
):
    out = tmp_path / "out"
    status = main(
        ["predict", "--run", str(run), str(folder), "--out", str(out), "--mc-samples", "5"]
    )

    assert status == 2
    lines = _stderr_lines(capsys)
    naming = [line for line in lines if "broken.png" in line]
    assert len(naming) == 1 and "truncated" in naming[0]
    assert lines[-1] == "cxrfusion predict: error: 1 of 5 input(s) could not be predicted"
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(Path(s).name for s in table["source"]) == sorted(
        p.name for p in folder.rglob("*.png") if p.name != "broken.png"
    )
    assert table[list(LABELS)].notna().all().all() and set(table["flag"]) <= {0, 1}
    document = json.loads((out / "predictions.json").read_text())
    assert len(document["predictions"]) == 4
    assert [Path(f["source"]).name for f in document["failed"]] == ["broken.png"]
    assert not list(out.glob(".*tmp"))  # nothing half-written left behind


def test_files_and_globs_are_each_predicted_once_and_success_exits_0(run, folder, tmp_path, capsys):
    first = sorted(folder.glob("*.png"))[0]
    out = tmp_path / "out"
    args = ["predict", "--run", str(run), str(first), str(folder / "*.png"), "--out", str(out)]
    status = main([*args, "--mc-samples", "3", "--batch-size", "1"])
    assert status == 0, capsys.readouterr().err
    table = pd.read_csv(out / "predictions.csv")
    assert table["source"].tolist() == [str(p) for p in sorted(folder.glob("*.png"))]


def test_predict_seeds_its_batches_as_the_api_does(run, folder, tmp_path, capsys):
    """Batch k draws its dropout masks under seed + k, in the CLI as in `predict_many`."""
    images = sorted(folder.glob("*.png"))
    out = tmp_path / "out"
    args = ["predict", "--run", str(run), *map(str, images), "--out", str(out)]
    assert main([*args, "--batch-size", "1", "--seed", "5"]) == 0, capsys.readouterr().err
    table = pd.read_csv(out / "predictions.csv")
    api = Classifier.load(run, device="cpu", seed=5).predict_many(images, batch_size=1)
    np.testing.assert_allclose(table[list(LABELS)], api.to_frame()[list(LABELS)], atol=1e-6)
    assert len(images) > 1 and api.to_frame()[[f"{x}_std" for x in LABELS]].max().max() > 0


def test_a_seed_outside_its_range_is_one_error_line(run, folder, capsys):
    image = str(sorted(folder.glob("*.png"))[0])
    assert main(["predict", "--run", str(run), image, "--seed", "-1"]) == 2
    assert _stderr_lines(capsys) == [
        "cxrfusion predict: error: --seed must be an integer in [0, 2**32), got -1"
    ]


def test_nothing_readable_is_one_error_line_and_no_output(run, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    out = tmp_path / "out"
    status = main(["predict", "--run", str(run), str(tmp_path / "bad.png"), "--out", str(out)])
    assert status == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "bad.png" in lines[0]
    assert not out.exists()


def test_gradcam_writes_one_overlay_per_image(run, folder, tmp_path, capsys):
    out = tmp_path / "out"
    image = str(sorted(folder.glob("*.png"))[0])
    status = main(["predict", "--run", str(run), image, "--out", str(out), "--gradcam"])
    assert status == 0, capsys.readouterr().err
    overlays = list((out / "gradcam").glob("*.png"))
    assert len(overlays) == 1 and overlays[0].stat().st_size > 1000
