"""Torch side of the data: one split of the prepared data, read from the image cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrfusion.data.cache import open_cache
from cxrfusion.data.options import Augmentation
from cxrfusion.data.split import SPLITS, read_split
from cxrfusion.data.transforms import augment, resize
from cxrfusion.labels import LABELS

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CachedXrayDataset(Dataset):
    """Radiographs of one split as uint8 images with float multi-hot targets and their index.

    The index lets distributed evaluation drop the repeats a distributed sampler pads with.

    Images stay uint8 until `transforms.normalize` runs on the device. Fetching goes through
    `__getitems__`, so the DataLoader hands over whole batches; augmentation draws from torch's RNG,
    which Lightning's `seed_everything(workers=True)` seeds per worker, so runs repeat.

    Args:
        images: the cache array (N, S, S) uint8, usually a read-only memory map.
        rows: cache row of each sample.
        targets: (len(rows), 14) 0/1 labels in LABELS order.
        input_size: side of the model input in pixels.
        augmentation: the report's augmentations (training only) or None.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        targets: np.ndarray,
        input_size: int = 224,
        augmentation: Augmentation | None = None,
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        self.input_size = input_size
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """(image uint8 (1, size, size), targets float (14,), index) for each index."""
        indices = list(indices)
        raw = self.images[self.rows[indices]]
        if self.augmentation is None:
            batch = resize(raw, self.input_size)
        else:
            batch = augment(raw, self.input_size, self.augmentation)
        images = torch.from_numpy(batch).unsqueeze(1)
        return list(zip(images, self.targets[indices], torch.tensor(indices), strict=True))


def split_datasets(
    prepared: Path,
    cache_size: int = 256,
    input_size: int = 224,
    augmentation: Augmentation | None = None,
    split_file: Path | None = None,
) -> dict[str, CachedXrayDataset]:
    """The train/val/test datasets of a prepared folder; augmentation applies to train only.

    Args:
        prepared: folder written by `cxrfusion prepare` (image cache, split.csv).
        split_file: another split.csv over the same images, e.g. the copy in a run directory.
    """
    split = read_split(split_file or prepared / "split.csv")
    cache = open_cache(prepared, cache_size)
    datasets = {}
    for name in SPLITS:
        part = split[split["split"] == name]
        rows = cache.rows_for(part["Image Index"].tolist(), prepared)
        datasets[name] = CachedXrayDataset(
            cache.images,
            rows,
            part[list(LABELS)].to_numpy(),
            input_size,
            augmentation if name == "train" else None,
        )
    return datasets
