"""How the images reach each training process: seeded, epoch-aware, split across processes."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cxrfusion.data.dataset import CachedXrayDataset


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

    Args:
        datasets: "train" (augmented) and "val" datasets; both must be non-empty.
        batch_size: images per batch on each process.
        workers: loader processes per training process.
        seed: seed of the shuffle (the dataset seeds the augmentation).
    """

    def __init__(
        self, datasets: dict[str, CachedXrayDataset], batch_size: int, workers: int, seed: int
    ) -> None:
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed

    def _loader(self, name: str, sampler: DistributedSampler, drop_last: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            pin_memory=torch.cuda.is_available(),
            # the loader's base seed comes from here, not from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(self.seed),
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
