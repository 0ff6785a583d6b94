"""Specifications for `cxrfusion predict`: every readable image predicted, every bad one named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicoms import compress, write_dicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless
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


@pytest.fixture
def assorted(nih_sample, tmp_path) -> tuple[Path, dict[str, str]]:
    """A real radiograph as PNG and as 8-bit DICOMs (plain, MONOCHROME1, RLE, JPEG 2000), among
    DICOM files met in the wild that are not radiographs it can read; those, with a word each
    one's error must contain."""
    folder = tmp_path / "assorted"
    folder.mkdir()
    png = shutil.copy(nih_sample / "images" / "00000013_019.png", folder / "radiograph.png")
    pixels = np.asarray(Image.open(png))  # grey levels 3..180: a stretch would change them
    mono2 = write_dicom(folder / "mono2.dcm", pixels)
    write_dicom(folder / "mono1.dcm", 255 - pixels, "MONOCHROME1")
    compress(mono2, folder / "rle.dcm", RLELossless)
    j2k = compress(mono2, folder / "j2k.dcm", JPEG2000Lossless)
    rgb = np.stack([pixels] * 3, axis=-1)
    write_dicom(folder / "colour.dcm", rgb, "RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    both = np.concatenate([pixels, pixels])
    write_dicom(folder / "cine.dcm", both, NumberOfFrames=2, Rows=pixels.shape[0])
    write_dicom(folder / "ct.dcm", pixels, Modality="CT")
    for name, modality in (("report.dcm", "SR"), ("empty.dcm", "DX")):
        dataset = pydicom.dcmread(write_dicom(folder / name, pixels, Modality=modality))
        del dataset.PixelData
        dataset.save_as(folder / name)
    data = mono2.read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])
    # No JPEG 2000 codestream where one should start: every pydicom decoder fails and logs it.
    data = j2k.read_bytes()
    start = data.index(b"\xff\x4f\xff\x51")
    (folder / "undecodable.dcm").write_bytes(data[:start] + bytes(16) + data[start + 16 :])
    bad = {
        "colour.dcm": "colour",
        "cine.dcm": "multi-frame",
        "ct.dcm": "Modality CT is not a radiograph",
        "report.dcm": "Modality SR is not a radiograph",
        "empty.dcm": "no PixelData",
        "cut.dcm": "truncated",
        "undecodable.dcm": "corrupt",
    }
    return folder, bad


def _console_script() -> list[str]:
    """The installed `cxrfusion` next to this Python, else the module (same `main`)."""
    script = Path(sys.executable).with_name("cxrfusion")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cxrfusion.cli"]


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


def test_assorted_dicoms_predict_the_radiographs_and_skip_each_other_file_on_one_line(
    run, assorted, tmp_path
):
    folder, bad = assorted
    out = tmp_path / "out"
    args = ["predict", "--run", str(run), str(folder), "--out", str(out), "--mc-samples", "3"]
    result = subprocess.run(
        [*_console_script(), *args], capture_output=True, text=True, timeout=300
    )

    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, result.stderr
    *skipped, summary = result.stderr.splitlines()
    good = ["j2k.dcm", "mono1.dcm", "mono2.dcm", "radiograph.png", "rle.dcm"]
    failed = f"{len(bad)} of {len(bad) + len(good)} input(s) could not be predicted"
    assert summary == f"cxrfusion predict: error: {failed}"
    assert len(skipped) == len(bad), result.stderr
    for name, words in bad.items():
        naming = [line for line in skipped if f"{name}: " in line]
        assert len(naming) == 1 and words in naming[0], (name, result.stderr)
    predicted = pd.read_csv(out / "predictions.csv")["source"]
    assert sorted(Path(s).name for s in predicted) == good


def test_a_real_radiograph_as_png_and_as_8bit_dicoms_gets_the_same_probabilities(run, assorted):
    folder, _ = assorted
    classifier = Classifier.load(run, device="cpu")
    seen = classifier.prepare(folder / "radiograph.png").image
    png = classifier.predict(folder / "radiograph.png").probability
    for name in ("mono2.dcm", "mono1.dcm", "rle.dcm", "j2k.dcm"):
        np.testing.assert_array_equal(classifier.prepare(folder / name).image, seen, name)
        difference = np.abs(classifier.predict(folder / name).probability - png).max()
        assert difference <= 1e-4, (name, difference)
