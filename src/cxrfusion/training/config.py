"""The configuration of a training run, saved as config.yaml in its run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError


@dataclass
class TrainConfig:
    """Everything a run needs; saved as config.yaml in the run directory (defaults: the report's Table 1).

    Args:
        prepared: folder written by `cxrfusion prepare` (split.csv + image cache).
        out: run directory.
        model: registry name; see `cxrfusion models`.
        weights: "imagenet" (download), "none" (random init) or a local weights file.
        epochs: maximum epochs over both phases.
        phase1_epochs: epochs with the backbone frozen (ignored by models without one).
        lr / phase2_lr / min_lr: phase-1 rate, phase-2 rate for all layers, plateau floor.
        early_stop_patience: epochs without a better validation macro AUC before stopping.
        cache_size / input_size: side of the cached images and of the model input.
        workers: loader processes; precision "auto" picks bf16/fp16 AMP on GPUs, fp32 on CPUs.
        limit_train_batches: fraction (<=1.0) or number of training batches per epoch (quick runs).
        logger: Lightning's step-level log in logs/, "csv" or "tensorboard" (metrics.csv, one
            row per epoch, is written either way).
    """

    prepared: str = "runs/prepared"
    out: str = "runs/simple_cnn"
    model: str = "simple_cnn"
    weights: str = "imagenet"
    loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    epochs: int = 25
    phase1_epochs: int = 5
    lr: float = 1e-3
    phase2_lr: float = 1e-5
    min_lr: float = 1e-5
    plateau_patience: int = 2
    plateau_factor: float = 0.1
    early_stop_patience: int = 5
    batch_size: int = 32
    cache_size: int = 256
    input_size: int = 224
    augmentation: dict = field(default_factory=lambda: dataclasses.asdict(Augmentation()))
    workers: int = 4
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    limit_train_batches: float = 1.0
    logger: str = "csv"

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CxrError(f"{path}: cannot read config ({error})") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CxrError(f"{path}: unknown config key(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
