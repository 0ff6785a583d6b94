"""Torch side of the data: one split of the prepared data, read from the image cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cxrfusion.data.cache import open_cache
from cxrfusion.data.options import Augmentation
from cxrfusion.data.split import SPLITS, read_split
from cxrfusion.data.transforms import augment, resize
from cxrfusion.labels import LABELS

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Key = int | tuple[int, int]  # a dataset index, or (epoch, index) from an epoch-aware sampler


class CachedXrayDataset(Dataset):
    """Radiographs of one split as uint8 images with float multi-hot targets and their index.

    The index lets distributed evaluation drop the repeats a distributed sampler pads with.

    Images stay uint8 until `transforms.normalize` runs on the device. Fetching goes through
    `__getitems__`, so the DataLoader hands over whole batches.

    Memory stays flat: the dataset holds the cache's file name, not its array, and each process
    (every loader worker, under fork or spawn) maps the file itself on first use, so a pickled
    dataset is a few kilobytes plus its targets and all workers share the page cache.

    Augmentation is a function of (seed, epoch, index): each epoch draws one table of random
    numbers (flip, rotation, zoom, brightness per image) from a generator seeded by (seed, epoch),
    so an epoch repeats exactly whatever the number of workers or processes, and a resumed run
    continues as if never stopped. The epoch comes with each key from the sampler
    (`training.data.EpochSampler` yields (epoch, index)).

    Args:
        images: the cache: its .npy file (opened lazily, memory-mapped), a memory map of it
            (only its file name is kept), or a small in-memory array (tests).
        rows: cache row of each sample.
        targets: (len(rows), 14) 0/1 labels in LABELS order.
        input_size: side of the model input in pixels.
        augmentation: the report's augmentations (training only) or None.
        seed: seed of the augmentation draws.
    """

    def __init__(
        self,
        images: Path | str | np.ndarray,
        rows: np.ndarray,
        targets: np.ndarray,
        input_size: int = 224,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        if isinstance(images, np.memmap):
            images = images.filename
        self.cache_path = None if isinstance(images, np.ndarray) else Path(images)
        self._images = images if isinstance(images, np.ndarray) else None
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        self.input_size = input_size
        self.augmentation = augmentation
        self.seed = seed
        self._draws: tuple[int, np.ndarray] | None = None  # (epoch, its table), made per process

    @property
    def images(self) -> np.ndarray:
        """The whole cache array (N, S, S) uint8, memory-mapped by this process on first use."""
        if self._images is None:
            # Where a process starts reading images (a loader worker, or evaluate): the loader's
            # workers are the parallelism, and OpenCV's own threads would fight them.
            cv2.setNumThreads(1)
            self._images = np.load(self.cache_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        """What a spawned worker receives: the cache's file name, never the mapped array."""
        state = self.__dict__.copy()
        state["_draws"] = None
        if self.cache_path is not None:
            state["_images"] = None
        return state

    def _epoch_draws(self, epoch: int) -> np.ndarray:
        """(len, 4) uniform numbers in [-1, 1) for every image of this epoch."""
        if self._draws is None or self._draws[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._draws = epoch, rng.uniform(-1, 1, (len(self), 4))
        return self._draws[1]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Key) -> Sample:
        return self.__getitems__([key])[0]

    def draws(self, keys: Sequence[Key]) -> tuple[np.ndarray, np.ndarray]:
        """The dataset indices of `keys` and each one's augmentation draws, (B,) and (B, 4).

        The draws are uniform in [-1, 1) (zeros without augmentation), a function of (seed,
        epoch, index): the loader's OpenCV warp and the device path (`device_augment`) read the
        same table, so both give an image the same flip, rotation, zoom and brightness.
        """
        pairs = [key if isinstance(key, tuple) else (0, key) for key in keys]
        indices = np.array([int(index) for _, index in pairs], dtype=np.int64)
        if self.augmentation is None:
            return indices, np.zeros((len(indices), 4))
        draws = np.stack([self._epoch_draws(int(epoch))[index] for epoch, index in pairs])
        return indices, draws.reshape(len(indices), 4)

    def __getitems__(self, keys: Sequence[Key]) -> list[Sample]:
        """(image uint8 (1, size, size), targets float (14,), index) for each key."""
        indices, draws = self.draws(keys)
        raw = self.images[self.rows[indices]]
        if self.augmentation is None:
            batch = resize(raw, self.input_size)
        else:
            batch = augment(raw, self.input_size, self.augmentation, draws)
        images = torch.from_numpy(batch).unsqueeze(1)
        index = torch.from_numpy(indices)
        return list(zip(images, self.targets[index], index, strict=True))


def split_datasets(
    prepared: Path,
    cache_size: int = 256,
    input_size: int = 224,
    augmentation: Augmentation | None = None,
    split_file: Path | None = None,
    seed: int = 0,
) -> dict[str, CachedXrayDataset]:
    """The train/val/test datasets of a prepared folder; augmentation applies to train only.

    Args:
        prepared: folder written by `cxrfusion prepare` (image cache, split.csv).
        split_file: another split.csv over the same images, e.g. the copy in a run directory.
        seed: seed of the training augmentation.
    """
    split = read_split(split_file or prepared / "split.csv")
    cache = open_cache(prepared, cache_size)
    datasets = {}
    for name in SPLITS:
        part = split[split["split"] == name]
        rows = cache.rows_for(part["Image Index"].tolist(), prepared)
        datasets[name] = CachedXrayDataset(
            cache.path,
            rows,
            part[list(LABELS)].to_numpy(),
            input_size,
            augmentation if name == "train" else None,
            seed,
        )
    return datasets
