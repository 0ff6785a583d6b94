"""The image cache held on the training device: batches gathered and augmented where the model is.

The loader path (`CachedXrayDataset` in loader workers) decodes nothing, but still warps every
image on a CPU core and copies the batch to the GPU. With the cache's rows on the GPU, the loader
hands over indices only: `RowBatches` turns a batch of sampler keys into cache positions, the
dataset's augmentation draws, targets and indices (microseconds, in the main process), and
`DeviceCache.batch` gathers the images by position and warps them there (`device_augment`). The
draws are the loader's own (seed, epoch, index) table, so both paths give each image the same
flip, rotation, zoom and brightness, and a resumed run still repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from cxrfusion.data.dataset import CachedXrayDataset, Key
from cxrfusion.data.device_augment import augment_batch, resize_batch
from cxrfusion.training.config import CACHE_ON_DEVICE

log = logging.getLogger(__name__)

# `auto` holds the cache on a GPU when its rows take at most this share of the GPU's free memory:
# the report's 44,700 training and validation images at 256 px are 2.9 GB, which leaves the model
# most of a 16 GB card.
FREE_MEMORY_SHARE = 0.25
COPY_ROWS = 1024  # rows per host-to-device copy: no second host copy of the whole cache

RowBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def wants_device_cache(mode: str, device: torch.device, nbytes: int) -> bool:
    """Whether to hold `nbytes` of cached images on `device`.

    Args:
        mode: "on" (whatever the device, the CPU included), "off", or "auto": on a CUDA device
            when `nbytes` is at most `FREE_MEMORY_SHARE` of its free memory.
    """
    if mode not in CACHE_ON_DEVICE:
        raise ValueError(
            f"cache_on_device must be one of {', '.join(CACHE_ON_DEVICE)}, got {mode!r}"
        )
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= FREE_MEMORY_SHARE * free


class DeviceCache:
    """The cache rows of some datasets as one uint8 tensor (N, S, S) on `device`.

    Args:
        datasets: datasets reading the same cache file; every row any of them uses is copied.
        device: where the rows go (a GPU; the CPU in tests).
    """

    def __init__(self, datasets: Sequence[CachedXrayDataset], device: torch.device) -> None:
        source = datasets[0].images
        self.rows = np.unique(np.concatenate([d.rows for d in datasets]))
        self.images = torch.empty(
            (len(self.rows), *source.shape[1:]), dtype=torch.uint8, device=device
        )
        for start in range(0, len(self.rows), COPY_ROWS):
            chunk = np.ascontiguousarray(source[self.rows[start : start + COPY_ROWS]])
            self.images[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
        log.info("image cache on %s: %d images, %.2f GB", device, len(self.rows), self.nbytes / 1e9)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    @staticmethod
    def nbytes_of(datasets: Sequence[CachedXrayDataset]) -> int:
        """Bytes the rows of `datasets` would take on the device."""
        rows = np.unique(np.concatenate([d.rows for d in datasets]))
        side = datasets[0].images.shape[-1]
        return len(rows) * side * side

    def positions(self, dataset: CachedXrayDataset) -> np.ndarray:
        """Where each of `dataset`'s samples lies in `images`."""
        return np.searchsorted(self.rows, dataset.rows)

    def batch(
        self,
        rows: RowBatch,
        dataset: CachedXrayDataset,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A `RowBatch` on the device -> (images uint8 (B, 1, size, size), targets, indices).

        What `CachedXrayDataset` gives for the same keys, up to interpolation rounding: the
        dataset's input size and augmentation (None: the plain resize).
        """
        positions, draws, targets, indices = rows
        images = self.images[positions]
        if dataset.augmentation is None:
            return resize_batch(images, dataset.input_size), targets, indices
        return (
            augment_batch(images, dataset.input_size, dataset.augmentation, draws),
            targets,
            indices,
        )


class RowBatches(torch.utils.data.Dataset):
    """A dataset's keys -> one `RowBatch`: cache positions, draws, targets, indices (no image).

    Fetched whole through `__getitems__` (the DataLoader's `collate_fn` must be `first`).

    Args:
        dataset: the dataset whose samples, targets and augmentation draws these are.
        positions: each sample's position in the `DeviceCache` (`DeviceCache.positions`).
    """

    def __init__(self, dataset: CachedXrayDataset, positions: np.ndarray) -> None:
        self.dataset = dataset
        self.positions = torch.from_numpy(np.asarray(positions, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: Sequence[Key]) -> RowBatch:
        indices, draws = self.dataset.draws(keys)
        index = torch.from_numpy(indices)
        draws = torch.from_numpy(draws.astype(np.float32))
        return self.positions[index], draws, self.dataset.targets[index], index


def first(batch: RowBatch) -> RowBatch:
    """The DataLoader's collate function for `RowBatches`: the batch is made whole already."""
    return batch
