"""ChestMNIST (MedMNIST v2) as a data source: its npz written as `prepare`'s split + image cache.

ChestMNIST is NIH ChestX-ray14 resized to 28 (MedMNIST+: 64, 128, 224) pixels, with MedMNIST's
split (78,468 / 11,219 / 22,433 images) and the 14 labels in the ChestX-ray8 paper's order; here
they are put in `LABELS` order by name. The split is kept as published. ChestMNIST has no patient
IDs, so each image is given its own `Patient ID` (1..N); whether the published split keeps a
patient's images together is MedMNIST's doing and cannot be checked here (`split_summary.json`
says so under `source`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrfusion.atomic import write_atomic
from cxrfusion.data.cache import cache_files
from cxrfusion.data.imageio import resize_square
from cxrfusion.data.nih import IMAGE_COLUMN, PATIENT_COLUMN
from cxrfusion.data.split import SPLIT_COLUMN, SPLITS
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS, NUM_LABELS

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)
SPEC = re.compile(r"chestmnist(?::(\d+))?")
# INFO["chestmnist"]["label"] of the medmnist package, in column order (tests check the match).
MEDMNIST_LABELS = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural",
    "hernia",
)
_OUR_NAME = {"pleural": "Pleural_Thickening"}
# For each of our LABELS, its column in ChestMNIST's label array.
COLUMNS = [
    [_OUR_NAME.get(m, m.capitalize()) for m in MEDMNIST_LABELS].index(label) for label in LABELS
]
PATIENTS_NOTE = (
    "ChestMNIST has no patient IDs: each image is its own Patient ID (1..N). The split is "
    "MedMNIST's published one, kept as is; patient-wise separation is MedMNIST's and is not "
    "checked here."
)
ROWS = 2048


def is_chestmnist(data: Path | str) -> bool:
    """`chestmnist[:SIZE]` or an `.npz` file (a folder is always an NIH folder)."""
    text = str(data)
    return not Path(data).is_dir() and (SPEC.fullmatch(text) is not None or text.endswith(".npz"))


def resolve(data: Path | str) -> Path:
    """The npz behind `--data`: a local file, or MedMNIST's download (cached by medmnist).

    Raises:
        CxrError: an unknown size, a missing file, medmnist absent or its download failing.
    """
    match = SPEC.fullmatch(str(data))
    if match is None:
        path = Path(data)
        if not path.is_file():
            raise CxrError(f"--data {data}: no such ChestMNIST .npz file")
        return path
    size = int(match.group(1) or 28)
    if size not in SIZES:
        raise CxrError(f"--data {data}: ChestMNIST sizes are {', '.join(map(str, SIZES))}")
    return _download(size)


def _download(size: int) -> Path:
    """medmnist's copy of the npz (`~/.medmnist`), downloaded there first if absent.

    Not through `medmnist.ChestMNIST(download=True)`: its constructor decompresses a whole split
    (the test images: ~1.1 GB at 224 px) and MD5-checks the file on every call. This is what its
    `download()` does, into a temporary folder renamed into place once the MD5 matches, so an
    interrupted download leaves nothing that a later call would take for the file.
    """
    try:
        from medmnist import INFO
        from medmnist import info as medmnist_info
    except ImportError:
        raise CxrError(
            "--data chestmnist needs the medmnist package (pip install 'cxrfusion[medmnist]'); "
            "offline, pass a downloaded file: --data path/to/chestmnist_224.npz"
        ) from None
    from torchvision.datasets.utils import download_url

    flag = "" if size == 28 else f"_{size}"
    name, info = f"chestmnist{flag}.npz", INFO["chestmnist"]
    root = Path(medmnist_info.DEFAULT_ROOT)
    if (root / name).is_file():
        return root / name
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
        try:
            download_url(info[f"url{flag}"], tmp, name, info[f"MD5{flag}"])
        except (RuntimeError, OSError):
            raise CxrError(
                f"--data chestmnist:{size}: could not download {name}; fetch "
                f"{info[f'url{flag}']} (MD5 {info[f'MD5{flag}']}) elsewhere and pass "
                f"--data path/to/{name}"
            ) from None
        os.replace(Path(tmp) / name, root / name)
    return root / name


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CxrError(f"{path}: not a readable .npz file ({error})") from None


def _open_member(archive: zipfile.ZipFile, key: str, path: Path) -> tuple[IO[bytes], tuple]:
    """An array of the npz as a stream positioned after its header, and the array's shape."""
    try:
        member = archive.open(f"{key}.npy")
    except KeyError:
        raise CxrError(f"{path}: no '{key}' array (not a MedMNIST npz)") from None
    version = np.lib.format.read_magic(member)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(member)
    if len(shape) != 3 or shape[1] != shape[2] or dtype != np.uint8 or fortran:
        raise CxrError(f"{path}: '{key}' must be uint8 (N, S, S) in C order, got {dtype} {shape}")
    return member, shape


def _image_shape(path: Path, key: str) -> tuple[int, int]:
    """(count, side) of an image array, read from its header only."""
    with _open_zip(path) as archive:
        member, shape = _open_member(archive, key, path)
        member.close()
    return shape[0], shape[1]


def _image_chunks(path: Path, key: str) -> Iterator[np.ndarray]:
    """The rows of an image array in chunks, streamed: a 224 px split is gigabytes."""
    with _open_zip(path) as archive:
        member, (count, side, _) = _open_member(archive, key, path)
        with member:
            for start in range(0, count, ROWS):
                rows = min(ROWS, count - start)
                data = member.read(rows * side * side)
                if len(data) != rows * side * side:
                    raise CxrError(f"{path}: '{key}' is truncated")
                yield np.frombuffer(data, np.uint8).reshape(rows, side, side)


def _labels(path: Path, split: str, count: int) -> np.ndarray:
    with np.load(path) as npz:
        key = f"{split}_labels"
        if key not in npz:
            raise CxrError(f"{path}: no '{key}' array (not a MedMNIST npz)")
        labels = npz[key]
    if labels.shape != (count, NUM_LABELS) or not np.isin(labels, (0, 1)).all():
        raise CxrError(f"{path}: '{key}' must be 0/1 of shape ({count}, 14), got {labels.shape}")
    return labels[:, COLUMNS].astype(np.uint8)


def read_split(path: Path) -> pd.DataFrame:
    """`make_split`'s frame from the npz: names `chestmnist_<split>_<row>`, one patient each."""
    parts = []
    for split in SPLITS:
        count, _ = _image_shape(path, f"{split}_images")
        labels = pd.DataFrame(_labels(path, split, count), columns=list(LABELS))
        names = [f"chestmnist_{split}_{i:06d}" for i in range(count)]
        head = pd.DataFrame({IMAGE_COLUMN: names, SPLIT_COLUMN: split})
        parts.append(pd.concat([head, labels], axis=1))
    table = pd.concat(parts, ignore_index=True)
    table.insert(1, PATIENT_COLUMN, np.arange(1, len(table) + 1, dtype=np.int64))
    return table


def _fingerprint(path: Path, size: int) -> str:
    stat = path.stat()
    text = f"chestmnist|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()


def write_cache(path: Path, out: Path, names: list[str], size: int, progress: bool = True) -> Path:
    """Write the images as `prepare`'s cache (`images_<size>.npy` + manifest), resized to `size`.

    Rows follow `names` (the split's order: train, val, test). Built under a hidden name and
    renamed into place, so a reader never sees half a cache; an up-to-date cache is kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    array_path, manifest_path = cache_files(out, size)
    fingerprint = _fingerprint(path, size)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if array_path.exists() and manifest.get("fingerprint") == fingerprint:
        log.info("image cache %s is up to date", array_path)
        return array_path
    partial = out / f".images_{size}.partial.npy"
    images = np.lib.format.open_memmap(partial, "w+", np.uint8, (len(names), size, size))
    row = 0
    with tqdm(total=len(names), desc="image cache", disable=None if progress else True) as bar:
        for split in SPLITS:
            for chunk in _image_chunks(path, f"{split}_images"):
                side = chunk.shape[1]
                resized = (
                    chunk if side == size else np.stack([resize_square(i, size) for i in chunk])
                )
                images[row : row + len(chunk)] = resized
                row += len(chunk)
                bar.update(len(chunk))
    images.flush()
    del images
    os.replace(partial, array_path)
    manifest = {"size": size, "fingerprint": fingerprint, "names": names, "failed": {}}
    write_atomic(manifest_path, json.dumps(manifest))
    return array_path


def load_chestmnist(
    data: Path | str, out: Path, size: int, labels_only: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Resolve, read and cache ChestMNIST for `prepare`.

    Args:
        data: `chestmnist[:SIZE]` (downloaded by medmnist at first use) or an npz path.
        out: the prepared folder.
        size: side of the cached images (`prepare --size`); MedMNIST's are resized to it.
        labels_only: write no image cache.

    Returns:
        The split frame and a `source` note for `split_summary.json`.
    """
    path = resolve(data)
    split = read_split(path)
    side = _image_shape(path, "train_images")[1]
    if not labels_only:
        write_cache(path, Path(out), split[IMAGE_COLUMN].tolist(), size)
    source = {
        "dataset": "ChestMNIST (MedMNIST v2)",
        "file": str(path),
        "image_size": int(side),
        "split": "MedMNIST's published split, kept as is (--split/--val/--test do not apply)",
        "patients": PATIENTS_NOTE,
    }
    log.info("ChestMNIST %s: %d images of %d px", path.name, len(split), side)
    return split, source
