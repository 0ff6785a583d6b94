"""ChestMNIST as a data source: a small npz in MedMNIST's published format, written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrfusion.cli import main
from cxrfusion.data.cache import open_cache
from cxrfusion.data.chestmnist import MEDMNIST_LABELS, PATIENTS_NOTE, read_split, resolve
from cxrfusion.data.imageio import resize_square
from cxrfusion.errors import CxrError

COUNTS = {"train": 240, "val": 60, "test": 100}
SIDE = 28


def _write_npz(path: Path, side: int = SIDE, drop: str | None = None) -> dict[str, np.ndarray]:
    """MedMNIST's layout: `<split>_images` uint8 (N, S, S), `<split>_labels` (N, 14) in MedMNIST's
    column order. Atelectasis (column 0) brightens the image, so a model has something to learn."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in COUNTS.items():
        labels = (rng.random((n, 14)) < 0.3).astype(np.uint8)
        images = rng.integers(0, 120, (n, side, side), dtype=np.uint8)
        images[labels[:, 0] == 1] += 100
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    arrays.pop(drop, None)
    np.savez_compressed(path, **arrays)
    return arrays


def test_labels_move_from_medmnist_columns_to_nih_order_by_name(tmp_path):
    arrays = _write_npz(tmp_path / "chestmnist.npz")
    split = read_split(tmp_path / "chestmnist.npz")
    train = split[split["split"] == "train"]
    for column, name in enumerate(MEDMNIST_LABELS):
        ours = "Pleural_Thickening" if name == "pleural" else name.capitalize()
        assert (train[ours].to_numpy() == arrays["train_labels"][:, column]).all(), name
    assert split["Patient ID"].is_unique  # no patient IDs in ChestMNIST: one per image


def test_medmnist_publishes_the_labels_and_split_sizes_assumed_here():
    medmnist = pytest.importorskip("medmnist", reason="optional extra [medmnist] not installed")
    info = medmnist.INFO["chestmnist"]
    assert tuple(info["label"][str(i)] for i in range(14)) == MEDMNIST_LABELS
    assert info["n_samples"] == {"train": 78468, "val": 11219, "test": 22433}


def test_prepare_chestmnist_then_train_and_evaluate_work_unchanged(tmp_path, capsys):
    npz = tmp_path / "chestmnist.npz"
    arrays = _write_npz(npz)
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    assert main(["prepare", "--data", str(npz), "--out", str(prepared), "--size", str(SIDE)]) == 0

    split = pd.read_csv(prepared / "split.csv")
    assert split["split"].value_counts().to_dict() == COUNTS  # MedMNIST's split, kept as is
    cache = open_cache(prepared, SIDE)
    rows = cache.rows_for(split["Image Index"].tolist())
    expected = np.concatenate([arrays[f"{s}_images"] for s in COUNTS])
    assert (cache.images[rows] == expected).all()
    summary = json.loads((prepared / "split_summary.json").read_text())
    assert summary["source"]["patients"] == PATIENTS_NOTE
    assert summary["test"]["images"] == COUNTS["test"]

    train = ["train", "--prepared", str(prepared), "--out", str(run), "--model", "simple_cnn",
             "--epochs", "1", "--phase1-epochs", "0", "--weights", "none", "--workers", "0",
             "--cache-size", str(SIDE), "--input-size", str(SIDE)]  # fmt: skip
    assert main(train) == 0
    evaluate = ["evaluate", "--run", str(run), "--bootstrap", "20", "--mc-samples", "2"]
    assert main(evaluate) == 0
    metrics = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert metrics["counts"]["images"] == COUNTS["test"]
    assert 0.0 <= metrics["auc"]["macro"]["auc"] <= 1.0


def test_prepare_resizes_chestmnist_to_the_requested_cache_size(tmp_path):
    npz = tmp_path / "chestmnist_64.npz"
    arrays = _write_npz(npz, side=64)
    assert main(["prepare", "--data", str(npz), "--out", str(tmp_path), "--size", "32"]) == 0
    cache = open_cache(tmp_path, 32)
    first_val = cache.images[cache.rows["chestmnist_val_000000"]]
    assert (first_val == resize_square(arrays["val_images"][0], 32)).all()


def test_a_npz_without_an_array_is_one_line_naming_the_file(tmp_path, capsys):
    npz = tmp_path / "chestmnist.npz"
    _write_npz(npz, drop="val_labels")
    assert main(["prepare", "--data", str(npz), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error == f"cxrfusion prepare: error: {npz}: no 'val_labels' array (not a MedMNIST npz)\n"
    assert not (tmp_path / "out" / "split.csv").exists()


def test_an_unknown_chestmnist_size_is_refused(tmp_path):
    with pytest.raises(CxrError, match="ChestMNIST sizes are 28, 64, 128, 224"):
        resolve("chestmnist:100")


def test_without_medmnist_the_error_names_the_extra_and_the_offline_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails as if not installed
    with pytest.raises(CxrError, match=r"cxrfusion\[medmnist\].*path/to/chestmnist_224.npz"):
        resolve("chestmnist:224")


@pytest.fixture
def medmnist_root(tmp_path, monkeypatch) -> Path:
    """medmnist's cache folder, moved into the test's folder."""
    medmnist = pytest.importorskip("medmnist", reason="optional extra [medmnist] not installed")
    monkeypatch.setattr(medmnist.info, "DEFAULT_ROOT", str(tmp_path / "medmnist"))
    return tmp_path / "medmnist"


def test_a_cached_npz_is_used_as_it_is_without_downloading(medmnist_root, monkeypatch):
    medmnist_root.mkdir()
    (medmnist_root / "chestmnist_64.npz").write_bytes(b"cached")
    monkeypatch.setattr(
        "torchvision.datasets.utils.download_url", lambda *a, **k: pytest.fail("downloaded")
    )
    assert resolve("chestmnist:64") == medmnist_root / "chestmnist_64.npz"


def test_a_download_lands_whole_or_not_at_all(medmnist_root, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        (Path(root) / filename).write_bytes(b"half")
        if len(calls) == 1:
            raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    with pytest.raises(CxrError, match=r"could not download chestmnist_128\.npz; fetch https"):
        resolve("chestmnist:128")
    assert list(medmnist_root.iterdir()) == []  # no partial file taken for the dataset later
    assert resolve("chestmnist:128") == medmnist_root / "chestmnist_128.npz"
    assert (medmnist_root / "chestmnist_128.npz").read_bytes() == b"half"
    assert calls[0][1] == "chestmnist_128.npz" and len(calls[0][2]) == 32  # MD5 checked
