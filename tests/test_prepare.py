"""`cxrfusion prepare` end to end, on a tiny NIH-layout folder and on a corpus of bad inputs."""

import gzip
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrfusion.cli import main
from cxrfusion.data.cache import open_cache
from cxrfusion.data.imageio import read_resized
from cxrfusion.data.nih import DEMOGRAPHIC_COLUMNS
from cxrfusion.labels import LABELS

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
ALL = ("--patient-fraction", "1.0")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _nih_folder(root: Path, patients: int = 30, per_patient: int = 2) -> Path:
    """A small dataset in the NIH layout with every label present."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = [HEADER]
    for patient in range(1, patients + 1):
        for follow_up in range(per_patient):
            name = f"{patient:08d}_{follow_up:03d}.png"
            label = LABELS[patient % len(LABELS)] if patient % 3 else "No Finding"
            lines.append(f"{name},{label},{follow_up},{patient},50,M,PA,64,64,0.14,0.14")
            pixels = rng.integers(0, 256, (64, 64), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root


def _run(capsys, *args: str) -> tuple[int, str]:
    """Exit code and the error report (stderr without the progress bars)."""
    code = main(["prepare", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "".join(line + "\n" for line in err.splitlines() if line.startswith("cxrfusion"))


def test_prepare_writes_split_summary_cache_and_figures(tmp_path, capsys):
    data = _nih_folder(tmp_path / "nih")
    out = tmp_path / "out"
    code, err = _run(
        capsys, "--data", str(data), "--out", str(out), "--size", "32", "--patient-fraction", "1.0"
    )
    assert code == 0, err
    for name in (
        "split.csv",
        "split_summary.md",
        "split_summary.json",
        "images_32.npy",
        "label_distribution.png",
        "sample_images.png",
    ):
        assert (out / name).exists(), name
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns[:3]) == ["Image Index", "Patient ID", "split"]
    assert list(split.columns[3:]) == [*LABELS, *DEMOGRAPHIC_COLUMNS, "source"]
    assert split.groupby("Patient ID")["split"].nunique().max() == 1
    cache = open_cache(out, 32)
    for name in split["Image Index"].head(5):
        np.testing.assert_array_equal(
            cache.images[cache.rows[name]], read_resized(data / "images" / name, 32)
        )
    summary = json.loads((out / "split_summary.json").read_text())
    assert summary["overall"]["images"] == len(split)


def test_labels_only_needs_no_images_and_repeats_byte_for_byte(tmp_path, capsys):
    data = _nih_folder(tmp_path / "nih")
    for png in (data / "images").glob("*.png"):
        png.unlink()
    for out in ("a", "b"):
        code, err = _run(capsys, "--data", str(data), "--out", str(tmp_path / out), "--labels-only")
        assert code == 0, err
    assert (tmp_path / "a/split.csv").read_bytes() == (tmp_path / "b/split.csv").read_bytes()
    assert not list((tmp_path / "a").glob("images_*"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A real PNG whose header claims width x height pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = (
        _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(64))) + _chunk(b"IEND", b"")
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def _break_image(kind: str):
    """Each kind of bad image, applied to the first image of a dataset."""

    def apply(path: Path) -> None:
        if kind == "zero-byte":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[:80])
        elif kind == "text":
            path.write_text("this is not a PNG")
        elif kind == "1x1":
            Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(path)
        elif kind == "huge-header":
            _png_header_only(path, 100_000, 100_000)
        elif kind == "absent":
            path.unlink()

    return apply


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zero-byte", "empty file"),
        ("truncated", "truncated or corrupt"),
        ("text", "not an image"),
        ("1x1", "too small"),
        ("huge-header", "too large"),
        ("absent", "not found"),
    ],
)
def test_a_bad_image_stops_prepare_with_one_line_and_no_output(tmp_path, capsys, kind, reason):
    data = _nih_folder(tmp_path / "nih")
    victim = data / "images" / "00000001_000.png"
    _break_image(kind)(victim)
    out = tmp_path / "out"
    code, err = _run(capsys, "--data", str(data), "--out", str(out), "--size", "32", *ALL)
    assert code == 2
    assert err.count("\n") == 1 and victim.name in err and reason in err
    visible = [p.name for p in out.glob("*") if not p.name.startswith(".")] if out.exists() else []
    assert visible == []  # no split, summary, cache or figure (hidden resume state may stay)

    code, err = _run(
        capsys, "--data", str(data), "--out", str(out), "--size", "32", "--skip-missing", *ALL
    )
    assert code == 0, err
    split = pd.read_csv(out / "split.csv")
    assert victim.name not in set(split["Image Index"])
    excluded = pd.read_csv(out / "excluded.csv")
    assert list(excluded["Image Index"]) == [victim.name] and reason in excluded["reason"][0]


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_16bit_and_rgba_images_are_converted_not_refused(tmp_path, capsys, mode):
    data = _nih_folder(tmp_path / "nih")
    victim = data / "images" / "00000001_000.png"
    if mode == "I;16":
        Image.fromarray(np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)).save(
            victim
        )
    else:
        Image.new("RGBA", (64, 64), (120, 120, 120, 128)).save(victim)
    code, err = _run(
        capsys, "--data", str(data), "--out", str(tmp_path / "out"), "--size", "32", *ALL
    )
    assert code == 0, err
    cache = open_cache(tmp_path / "out", 32)
    row = cache.images[cache.rows[victim.name]]
    assert row.dtype == np.uint8 and row.max() > 0


def _rewrite_csv(data: Path, edit) -> Path:
    csv = data / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(edit(lines)) + ("\n" if edit(lines) else ""))
    return csv


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda lines: [lines[0].replace("Patient ID", "Patient")] + lines[1:], "Patient ID"),
        (
            lambda lines: (
                lines[:2] + [lines[2].replace(lines[2].split(",")[1], "Fracture")] + lines[3:]
            ),
            "Fracture",
        ),
        (lambda lines: lines + [lines[1]], "duplicate"),
        (lambda lines: [], "empty"),
        (lambda lines: lines[:1], "no data rows"),
    ],
    ids=["missing-column", "unknown-label", "duplicate-index", "empty-file", "header-only"],
)
def test_a_bad_label_table_stops_with_one_line_naming_it(tmp_path, capsys, edit, reason):
    data = _nih_folder(tmp_path / "nih")
    csv = _rewrite_csv(data, edit)
    out = tmp_path / "out"
    code, err = _run(capsys, "--data", str(data), "--out", str(out), "--labels-only")
    assert code == 2
    assert err.count("\n") == 1 and csv.name in err and reason.lower() in err.lower(), err
    assert not out.exists()


def test_official_split_keeps_the_test_list_exactly(tmp_path, capsys):
    data = _nih_folder(tmp_path / "nih", patients=40)
    names = pd.read_csv(data / "Data_Entry_2017_v2020.csv", index_col=False)["Image Index"]
    test = [n for n in names if int(n[:8]) % 5 == 0]
    (data / "test_list.txt").write_text("\n".join(test))
    with gzip.open(data / "train_val_list.txt.gz", "wt") as handle:
        handle.write("\n".join(n for n in names if n not in test))
    code, err = _run(
        capsys,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--labels-only",
        "--split",
        "official",
    )
    assert code == 0, err
    split = pd.read_csv(tmp_path / "out" / "split.csv")
    assert sorted(split.loc[split["split"] == "test", "Image Index"]) == sorted(test)


@pytest.mark.skipif(not (SHARED / "nih14-sample").exists(), reason="../shared/data is absent")
def test_prepare_builds_the_cache_from_real_nih_images(tmp_path, capsys):
    code, err = _run(
        capsys,
        "--data",
        str(SHARED / "nih14-sample"),
        "--out",
        str(tmp_path),
        "--size",
        "64",
        "--patient-fraction",
        "1.0",
        "--workers",
        "2",
    )
    assert code == 0, err
    split = pd.read_csv(tmp_path / "split.csv")
    assert len(split) == 1770
    assert split.groupby("Patient ID")["split"].nunique().max() == 1
    cache = open_cache(tmp_path, 64)
    name = split["Image Index"].iloc[-1]
    np.testing.assert_array_equal(
        cache.images[cache.rows[name]],
        read_resized(SHARED / "nih14-sample" / "images" / name, 64),
    )


def test_help_answers_without_loading_the_model_stack():
    # Every parser is built for --help: reading defaults must not import torch or sklearn.
    code = (
        "import sys; from cxrfusion.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'sklearn', 'cv2'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
