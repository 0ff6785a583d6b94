"""Images/s per core: decoding + resizing the PNGs vs the cached dataset with the report's augmentations.

Both are measured side by side in this one run, in this one process (one core, one thread):
  (a) `read_resized` on NIH's full-size PNGs (the work a loader without a cache does every epoch);
  (b) the training dataset on a cache of those images: batch gather + flip/rotate/zoom/brightness to
      224 px + uint8 tensors (normalisation runs on the device, see data/transforms.py).

    .venv/bin/python bench/loader.py [--images DIR] [--seconds 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxrfusion.data.cache import build_cache
from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.data.imageio import read_resized
from cxrfusion.data.options import Augmentation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-fullres" / "images"


def _synthetic_pngs(folder: Path) -> list[Path]:
    """Full-size stand-ins when ../shared is absent (real NIH PNGs are preferred)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(32):
        smooth = rng.normal(size=(64, 64)).cumsum(0).cumsum(1)
        image = np.kron(smooth, np.ones((16, 16)))
        image = (255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
        paths.append(folder / f"{i:08d}_000.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def rate(work, seconds: float) -> float:
    """Items per second of `work()` (which returns how many items it did), over >= `seconds`."""
    work()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += work()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=SHARED, help="folder of PNGs")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(args.images.glob("*.png")) if args.images.is_dir() else []
        source = f"{len(paths)} real NIH PNGs from {args.images}"
        if not paths:
            paths = _synthetic_pngs(Path(tmp))
            source = f"{len(paths)} synthetic 1024x1024 PNGs (../shared absent)"
        cache = build_cache(paths, Path(tmp) / "cache", size=256, progress=False)
        rows = np.resize(np.arange(len(paths)), 4096)
        dataset = CachedXrayDataset(
            cache.images, rows, np.zeros((len(rows), 14)), 224, Augmentation()
        )
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)

        def decode() -> int:
            for path in paths:
                read_resized(path, 256)
            return len(paths)

        def cached() -> int:
            return sum(len(images) for images, _, _ in loader)

        with Image.open(paths[0]) as first:
            source += f", {first.size[0]}x{first.size[1]} {first.mode}"
        decode_rate = rate(decode, args.seconds)
        cached_rate = rate(cached, args.seconds)
    print(f"source: {source}")
    print(f"(a) decode + resize PNG to 256:               {decode_rate:9.1f} images/s per core")
    print(
        f"(b) cached dataset, augmentations, 224, b{args.batch}: {cached_rate:9.1f} images/s per core"
    )
    print(f"ratio (b)/(a): {cached_rate / decode_rate:.1f}x")


if __name__ == "__main__":
    main()
