"""How the images reach each training process: seeded, epoch-aware, split across processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.training.device_data import DeviceCache, RowBatches, first, wants_device_cache


class EpochSampler(DistributedSampler):
    """A shuffling `DistributedSampler` that also hands the epoch to the dataset.

    Its order is a function of (seed, epoch) alone (torch's seed + epoch permutation), nothing is
    carried over from earlier epochs, so a run resumed at epoch k sees exactly the batches an
    uninterrupted run sees there. It yields (epoch, index) keys so that the dataset seeds each
    image's augmentation by (seed, epoch, index) too (see `CachedXrayDataset`).
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class CxrDataModule(L.LightningDataModule):
    """Training and validation loaders, made once the Trainer knows the process count and rank.

    Lightning's own sampler injection is off (`use_distributed_sampler=False`): the training
    sampler must stay seeded and epoch-aware with one process too. Validation shards the split
    with a `DistributedSampler` that pads to equal shards; `CxrClassifier` drops the padded repeats
    by index, so the validation AUC does not depend on the number of processes.

    Images reach the model by one of two paths, chosen in `setup` once the device is known:
    loader workers warp each image with OpenCV (`CachedXrayDataset`), or the cache is copied to the
    device once and batches are gathered and augmented there (`device_data`; `cache_on_device`).
    On a GPU the loader pins its batches and Lightning copies them without blocking.

    Args:
        datasets: "train" (augmented) and "val" datasets; both must be non-empty.
        batch_size: images per batch on each process.
        workers: loader processes per training process (the device path needs none).
        seed: seed of the shuffle (the dataset seeds the augmentation).
        cache_on_device: "auto", "on" or "off" (see `device_data.wants_device_cache`).
    """

    def __init__(
        self,
        datasets: dict[str, CachedXrayDataset],
        batch_size: int,
        workers: int,
        seed: int,
        cache_on_device: str = "off",
    ) -> None:
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed
        self.cache_on_device = cache_on_device
        self.device_cache: DeviceCache | None = None

    def setup(self, stage: str) -> None:
        """Copy the training and validation images to the device if `cache_on_device` says so."""
        if self.cache_on_device == "off" or self.device_cache is not None:
            return
        device = self.trainer.strategy.root_device
        used = [self.datasets["train"], self.datasets["val"]]
        if wants_device_cache(self.cache_on_device, device, DeviceCache.nbytes_of(used)):
            self.device_cache = DeviceCache(used, device)

    def _loader(self, name: str, sampler: DistributedSampler, drop_last: bool) -> DataLoader:
        pin = self.trainer.strategy.root_device.type == "cuda"
        # the loader's base seed comes from here, not from the global RNG that dropout uses
        generator = torch.Generator().manual_seed(self.seed)
        if self.device_cache is not None:  # indices only: workers would cost more than they save
            rows = RowBatches(self.datasets[name], self.device_cache.positions(self.datasets[name]))
            return DataLoader(
                rows,
                batch_size=self.batch_size,
                sampler=sampler,
                drop_last=drop_last,
                collate_fn=first,
                pin_memory=pin,
                generator=generator,
            )
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            pin_memory=pin,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = self.datasets["train"]
        sampler = EpochSampler(data, world, rank, shuffle=True, seed=self.seed)
        return self._loader("train", sampler, drop_last=len(sampler) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.datasets["val"], world, rank, shuffle=False)
        return self._loader("val", sampler, drop_last=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device path, a batch of cache positions becomes a batch of images here."""
        if self.device_cache is None:
            return batch
        dataset = self.datasets["train" if self.trainer.training else "val"]
        return self.device_cache.batch(batch, dataset)
