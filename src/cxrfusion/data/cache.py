"""Pre-resized uint8 image cache: decode every radiograph once, then train from a memory map.

Layout in the output folder, for a cache of side `size`:
    images_<size>.npy    uint8 array (N, size, size), row i holds names[i]
    images_<size>.json   {"size", "fingerprint", "names", "failed": {name: reason}}

The fingerprint covers the cache side and each source file's path, size and modification time, so a
changed, added or removed image rebuilds the cache.

The array is written into `.images_<size>.partial.npy` with a bitmap of finished rows saved after every
chunk, so an interrupted build resumes where it stopped; the finished files are renamed into place, so a
reader never sees a half-built cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxrfusion.atomic import write_atomic
from cxrfusion.data.imageio import read_resized
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)
CHUNK = 256


@dataclass(frozen=True)
class ImageCache:
    """An opened cache: a read-only memory map plus the row of each image name.

    `path` is the array file: datasets keep it rather than the map, and open the map lazily in
    each loader worker (see `dataset.CachedXrayDataset`).
    """

    images: np.ndarray
    rows: dict[str, int]
    failed: dict[str, str]
    path: Path
    fingerprint: str

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def rows_for(self, names: Sequence[str], where: Path | str = "cache") -> np.ndarray:
        """Cache rows of `names`; a name the cache lacks or could not decode is an error."""
        missing = [n for n in names if n not in self.rows or n in self.failed]
        if missing:
            raise CxrError(
                f"{where}: {len(missing)} image(s) not in the cache, e.g. {missing[0]}: "
                "run `cxrfusion prepare` again on this data"
            )
        return np.fromiter((self.rows[n] for n in names), dtype=np.int64, count=len(names))


def cache_files(out: Path, size: int) -> tuple[Path, Path]:
    """The array and manifest paths of a cache of side `size` in `out`."""
    return out / f"images_{size}.npy", out / f"images_{size}.json"


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache manifest (or partial-build state); unreadable or malformed is a CxrError naming it."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CxrError(
            f"{path}: corrupt cache manifest ({error}); delete it and run prepare"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), str):
        raise CxrError(
            f"{path}: corrupt cache manifest (no fingerprint); delete it and run prepare"
        )
    return manifest


def open_cache(out: Path, size: int) -> ImageCache:
    """Open a finished cache read-only (memory-mapped, so workers share the page cache)."""
    array_path, manifest_path = cache_files(out, size)
    if not array_path.exists() or not manifest_path.exists():
        raise CxrError(f"{array_path}: no image cache of size {size}; run `cxrfusion prepare`")
    manifest = read_manifest(manifest_path)
    names, failed = manifest.get("names"), manifest.get("failed")
    if not isinstance(names, list) or not isinstance(failed, dict):
        raise CxrError(f"{manifest_path}: corrupt cache manifest (names or failed missing)")
    try:
        images = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CxrError(f"{array_path}: unreadable image cache ({error}); run prepare") from None
    if images.shape != (len(names), size, size):
        raise CxrError(f"{array_path}: shape {images.shape} does not match its manifest")
    rows = {n: i for i, n in enumerate(names)}
    return ImageCache(images, rows, failed, array_path, manifest["fingerprint"])


def _fingerprint(paths: Sequence[Path], size: int) -> str:
    """Side, then each file's path, size and modification time: a changed file rebuilds."""
    digest = hashlib.sha256(str(size).encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError as error:
            raise CxrError(f"{path}: cannot read ({error.strerror})") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _decode(job: tuple[int, Path, int]) -> tuple[int, np.ndarray | None, str | None]:
    index, path, size = job
    try:
        return index, read_resized(path, size), None
    except CxrError as error:
        return index, None, str(error)


def build_cache(
    paths: Sequence[Path],
    out: Path,
    size: int = 256,
    workers: int = 1,
    progress: bool = True,
    allow_failures: bool = False,
    names: Sequence[str] | None = None,
) -> ImageCache:
    """Decode and resize every image into the cache (resuming an interrupted build).

    Args:
        paths: image files, in the order of their cache rows.
        out: folder that receives the cache.
        size: side of the stored square images; the loader resizes to the model's input from here,
            so keep it a little above the input (256 for 224) to leave room for zoom augmentation.
        workers: decoding processes (decoding PNGs is the slow part: use all cores).
        progress: show a progress bar.
        allow_failures: publish the cache even if some images fail to decode (they are recorded
            in `failed`, file: reason, with a blank row). Otherwise such failures raise CxrError
            and the decoded rows stay in the hidden partial files, so the next run resumes.
        names: the unique name of each image (the split's `Image Index`); default the file
            names, unique in NIH's layout but not in CheXpert's (`view1_frontal.jpg`).
    """
    out.mkdir(parents=True, exist_ok=True)
    array_path, manifest_path = cache_files(out, size)
    fingerprint = _fingerprint(paths, size)
    file_names = [p.name for p in paths]
    names = file_names if names is None else list(names)
    if names != file_names:  # the same files under other names are another cache
        fingerprint = hashlib.sha256((fingerprint + json.dumps(names)).encode()).hexdigest()
    if manifest_path.exists() and read_manifest(manifest_path)["fingerprint"] == fingerprint:
        log.info("image cache %s is up to date", array_path)
        return open_cache(out, size)

    partial = out / f".images_{size}.partial.npy"
    state_path = out / f".images_{size}.partial.json"
    state = _partial_state(state_path)
    if partial.exists() and state.get("fingerprint") == fingerprint:
        images = np.load(partial, mmap_mode="r+")
        packed = np.frombuffer(bytes.fromhex(state["done"]), dtype=np.uint8)
        done = np.unpackbits(packed, count=len(paths)).astype(bool)
        failed = state["failed"]
        log.info("resuming image cache: %d of %d done", done.sum(), len(paths))
    else:
        images = np.lib.format.open_memmap(partial, "w+", np.uint8, (len(paths), size, size))
        done = np.zeros(len(paths), dtype=bool)
        failed = {}

    todo = np.flatnonzero(~done)
    bar = tqdm(
        total=len(paths),
        initial=int(done.sum()),
        desc="image cache",
        disable=None if progress else True,  # None: no bar when stderr is not a terminal
    )
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Serial() as pool:
        for start in range(0, len(todo), CHUNK):
            jobs = [(int(i), paths[i], size) for i in todo[start : start + CHUNK]]
            for index, image, error in pool.map(_decode, jobs, chunksize=16):
                if error is None:
                    images[index] = image
                else:
                    images[index] = 0
                    failed[names[index]] = error
                done[index] = True
            images.flush()  # rows on disk before they are marked done
            state = {
                "fingerprint": fingerprint,
                "done": np.packbits(done).tobytes().hex(),
                "failed": failed,
            }
            write_atomic(state_path, json.dumps(state))
            bar.update(len(jobs))
    bar.close()
    del images
    if failed and not allow_failures:
        reason = next(iter(failed.values()))
        raise CxrError(
            f"{len(failed)} image(s) could not be decoded, first {reason}; fix them or pass "
            "--skip-missing to exclude them (decoded images are kept for the next run)"
        )

    manifest = {"size": size, "fingerprint": fingerprint, "names": names, "failed": failed}
    os.replace(partial, array_path)
    write_atomic(manifest_path, json.dumps(manifest))
    state_path.unlink()
    return open_cache(out, size)


def _partial_state(path: Path) -> dict[str, Any]:
    """The state of an interrupted build; a damaged one only costs a fresh start."""
    if not path.exists():
        return {}
    try:
        return read_manifest(path)
    except CxrError as error:
        log.warning("%s: starting the image cache afresh", error)
        return {}


class _Serial:
    """`ProcessPoolExecutor`'s map in this process: no start-up cost for small caches or tests."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, items, chunksize: int = 1):
        return map(fn, items)
