"""The configuration of a training run, saved as config.yaml in its run directory."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cxrfusion.checks import (
    InvalidOption,
    check_bool,
    check_choice,
    check_number,
    check_text,
    setting,
)
from cxrfusion.data.options import MIN_SIZE, Augmentation
from cxrfusion.errors import CxrError

LOSSES = ("focal", "bce", "asl")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
LOGGERS = ("csv", "tensorboard")
CACHE_ON_DEVICE = ("auto", "on", "off")  # training.device_data's modes (it imports torch)
# Lightning's forms: auto, -1 (all), a count, or indices ("0,1", or "1," for index 1 alone).
DEVICES = re.compile(r"auto|-1|[1-9]\d*|\d+(,\d+)+|\d+,")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_devices(value: object) -> None:
    if isinstance(value, list) and value and all(type(v) is int and v >= 0 for v in value):
        return
    if type(value) is int and (value >= 1 or value == -1):
        return
    if isinstance(value, str) and DEVICES.fullmatch(value.strip()):
        return
    raise InvalidOption(
        f"{setting('devices')} must be auto, a count (-1 for all) or device indices such as 0,1, "
        f"got {value!r}"
    )


def _check_augmentation(value: object) -> None:
    if not isinstance(value, dict):
        raise InvalidOption(f"augmentation must be a mapping of its settings, got {value!r}")
    known = {f.name for f in dataclasses.fields(Augmentation)}
    unknown = sorted(str(key) for key in set(value) - known)
    if unknown:
        raise InvalidOption(
            f"augmentation: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    Augmentation(**value)


# Each setting's own check; ranges that involve two settings are in `TrainConfig.__post_init__`.
_CHECKS = {
    "prepared": check_text,
    "out": check_text,
    "model": check_text,
    "weights": check_text,
    "loss": lambda n, v: check_choice(n, v, LOSSES),
    "focal_alpha": lambda n, v: check_number(n, v, high=1),  # negative: no weighting
    "focal_gamma": lambda n, v: check_number(n, v, low=0),
    "epochs": lambda n, v: check_number(n, v, integer=True, low=1),
    "phase1_epochs": lambda n, v: check_number(n, v, integer=True, low=0),
    "lr": lambda n, v: check_number(n, v, above=0),
    "phase2_lr": lambda n, v: check_number(n, v, above=0),
    "min_lr": lambda n, v: check_number(n, v, low=0),
    "plateau_patience": lambda n, v: check_number(n, v, integer=True, low=0),
    "plateau_factor": lambda n, v: check_number(n, v, above=0, below=1),
    "early_stop_patience": lambda n, v: check_number(n, v, integer=True, low=0),
    "batch_size": lambda n, v: check_number(n, v, integer=True, low=1),
    "cache_size": lambda n, v: check_number(n, v, integer=True, low=MIN_SIZE),
    "input_size": lambda n, v: check_number(n, v, integer=True, low=MIN_SIZE),
    "augmentation": lambda n, v: _check_augmentation(v),
    "workers": lambda n, v: check_number(n, v, integer=True, low=0),
    "seed": lambda n, v: check_number(n, v, integer=True, low=0, high=2**32 - 1),
    "accelerator": lambda n, v: check_choice(n, v, ACCELERATORS),
    "devices": lambda n, v: _check_devices(v),
    "num_nodes": lambda n, v: check_number(n, v, integer=True, low=1),
    "strategy": check_text,
    "precision": lambda n, v: check_choice(n, v, PRECISIONS),
    "channels_last": check_bool,
    "compile": check_bool,
    "cache_on_device": lambda n, v: check_choice(n, v, CACHE_ON_DEVICE),
    "deterministic": check_bool,
    "limit_train_batches": lambda n, v: check_number(n, v, above=0),
    "logger": lambda n, v: check_choice(n, v, LOGGERS),
}


def check_can_run(config: TrainConfig) -> None:
    """What `TrainConfig` cannot check alone: the model name, the weights file, the strategy and
    whether this machine has the accelerator asked for.

    Not part of the config's own checks because it imports torch, timm and Lightning (seconds) and
    depends on the machine: the CLI calls it once the cheap checks have passed.
    """
    import timm
    import torch
    from lightning.pytorch.strategies import StrategyRegistry

    from cxrfusion.models import list_models

    if config.model not in list_models() and not timm.is_model(config.model):
        raise InvalidOption(
            f"{setting('model')} must be one of {', '.join(list_models())} or a timm model name "
            f"(timm.list_models()), got {config.model!r}"
        )
    named = config.weights in ("imagenet", "none") or config.weights.startswith("torchxrayvision:")
    if not named and not Path(config.weights).is_file():
        raise InvalidOption(
            f"{setting('weights')} must be imagenet, none, torchxrayvision:NAME or a weights "
            f"file, got {config.weights!r} (no such file)"
        )
    if config.strategy != "auto" and config.strategy not in StrategyRegistry.available_strategies():
        raise InvalidOption(
            f"{setting('strategy')} must be auto or a Lightning strategy such as ddp, ddp_spawn, "
            f"fsdp (StrategyRegistry.available_strategies()), got {config.strategy!r}"
        )
    if config.input_size < 32:  # ChestMNIST's 28 px: too small for the backbones' downsampling?
        from cxrfusion.models import create_model

        try:
            with torch.no_grad():
                create_model(config.model).eval()(torch.zeros(1, 3, *[config.input_size] * 2))
        except RuntimeError:
            raise InvalidOption(
                f"{setting('input_size')} {config.input_size} px is too small for "
                f"{config.model}'s downsampling; use 32 or more (simple_cnn trains at 28)"
            ) from None
    available = {
        "gpu": torch.cuda.is_available(),
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(config.accelerator, True):
        raise InvalidOption(
            f"{setting('accelerator')} {config.accelerator}: no such device on this machine; "
            "use auto or cpu"
        )


@dataclass
class TrainConfig:
    """Everything a run needs; saved as config.yaml in the run directory (defaults: the report's Table 1).

    Args:
        prepared: folder written by `cxrfusion prepare` (split.csv + image cache).
        out: run directory.
        model: registry name; see `cxrfusion models`.
        weights: "imagenet" (download), "none" (random init) or a local weights file.
        epochs: maximum epochs over both phases.
        phase1_epochs: epochs with the backbone frozen (ignored by models without one); at or
            above `epochs` the backbone is never trained (a linear probe), so it is not an error.
        lr / phase2_lr / min_lr: phase-1 rate, phase-2 rate for all layers, plateau floor.
        early_stop_patience: epochs without a better validation macro AUC before stopping.
        cache_size / input_size: side of the cached images and of the model input.
        workers: loader processes; precision "auto" picks bf16/fp16 AMP on GPUs, fp32 on CPUs.
        channels_last: NHWC memory layout of the model and its input (faster convolutions).
        compile: `torch.compile` the model (minutes of compilation at the start, then faster
            steps on a GPU); checkpoints are the same either way, so a run resumes with or
            without it.
        cache_on_device: hold the image cache on the training device and augment there
            (`training.device_data`): "on", "off", or "auto" (on a GPU whose free memory holds
            the training and validation images four times over).
        deterministic: repeatable kernels (`torch.use_deterministic_algorithms`, warning where
            an operation has none) instead of cuDNN's autotuned, fastest ones.
        limit_train_batches: fraction (<=1.0) or number of training batches per epoch (quick runs).
        logger: Lightning's step-level log in logs/, "csv" or "tensorboard" (metrics.csv, one
            row per epoch, is written either way).

    Every setting is checked when set (constructor, YAML, later assignment) and raises
    `InvalidOption` (a CxrError) naming it; `check_can_run` checks the rest.
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
    compile: bool = False
    cache_on_device: str = "auto"
    deterministic: bool = False
    limit_train_batches: float = 1.0
    logger: str = "csv"

    def __setattr__(self, name: str, value: object) -> None:
        """Each setting is checked as it is set: in the constructor and on later assignment."""
        if name in _CHECKS:
            _CHECKS[name](name, value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        if self.input_size > self.cache_size:
            raise InvalidOption(
                f"{setting('input_size')} must be <= {setting('cache_size')}: the model input is "
                f"cut from the cached images, got {self.input_size} > {self.cache_size}"
            )
        if self.limit_train_batches > 1:  # a count of batches: Lightning refuses it as a float
            if self.limit_train_batches != int(self.limit_train_batches):
                raise InvalidOption(
                    f"{setting('limit_train_batches')} must be a fraction in (0, 1] or a whole "
                    f"number of batches, got {self.limit_train_batches}"
                )
            self.limit_train_batches = int(self.limit_train_batches)

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CxrError(f"{path}: cannot read config ({first})") from None
        if not isinstance(values, dict):
            raise CxrError(f"{path}: expected a mapping of option: value, got {values!r}")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CxrError(f"{path}: unknown config key(s): {', '.join(sorted(map(str, unknown)))}")
        try:
            return cls(**_numbers_from_text(values))
        except CxrError as error:
            raise InvalidOption(f"{path}: {error}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _numbers_from_text(values: dict) -> dict:
    """YAML 1.1 reads `1e-3` (no dot) as a string: turn such text into the float it means."""
    floats = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"}
    return {
        key: float(value)
        if key in floats and isinstance(value, str) and NUMBER.fullmatch(value.strip())
        else value
        for key, value in values.items()
    }
