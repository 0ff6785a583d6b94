"""Training images/s: bare PyTorch vs cxrfusion, eager vs compiled, loader vs device data path, one epoch.

Four tables, each measured in this one process on the same device:
  1. steps: per model and batch size, a bare PyTorch loop (normalize > forward > focal loss >
     backward > Adam) against cxrfusion's step in Lightning's Trainer (`CxrClassifier`), both on
     the same random batches held in memory, eager and `torch.compile`d. ours/bare is the
     framework's overhead (target <= 1.05x). The two alternate for `--rounds` rounds and each keeps
     its fastest, so neither gains from running second on a warm machine.
  2. settings: cxrfusion's step on the first model and batch with each speed setting turned off
     (channels-last, cuDNN autotuning) or on (compile), against the defaults of `cxrfusion train`.
  3. data paths: the same step fed from an image cache on disk, through `CxrDataModule`, once by
     loader workers warping on CPU cores (`--cache-on-device off`) and once from the cache held on
     the device (`on`): what the loader costs or saves.
  4. epoch: `cxrfusion.training.fit.train` for one epoch of `--epoch-images` cached images (loader,
     validation of a small split, checkpoints: a real run) for each data path.
The cache for 3 and 4 is random pixels in `prepare`'s layout (speed does not depend on content),
or `--prepared DIR`. On a GPU, `bench/gpu.sh` runs the real settings; on a CPU, `--tiny`.

    .venv/bin/python bench/train_step.py --tiny
    python3 bench/train_step.py --size 224 --batches 32 128 --epoch-images 39242   # a GPU

`--precision auto` is what `cxrfusion train` uses: bf16 AMP on a GPU that has it, fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxrfusion.atomic import write_atomic
from cxrfusion.data.cache import cache_files
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.options import Augmentation
from cxrfusion.data.split import write_split
from cxrfusion.data.transforms import normalize
from cxrfusion.labels import LABELS
from cxrfusion.models import create_model, list_models
from cxrfusion.training import fit
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.data import CxrDataModule
from cxrfusion.training.losses import create_loss
from cxrfusion.training.module import CxrClassifier

TINY = dict(
    models=["simple_cnn"],
    size=64,
    batches=[8, 16],
    steps=4,
    warmup=2,
    rounds=1,
    cache_size=72,
    cache_images=512,
    epoch_images=1024,
    workers=1,
)


def _batches(count: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=generator),
            (torch.rand(batch, 14, generator=generator) < 0.1).float(),
        )
        for _ in range(count)
    ]


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context Lightning's `precision` names (a no-op for 32-true)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(
    name: str, batches: list, device: torch.device, warmup: int, precision: str, compiled: bool
) -> float:
    """Seconds per step of the plainest loop that trains the same model the same way."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as `cxrfusion train` sets it
    model = create_model(name).to(device, memory_format=torch.channels_last).train()
    if compiled:
        model.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = create_loss("focal")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    for step, (images, targets) in enumerate(batches):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        x = normalize(images).contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            logits = model(x)
        loss = loss_fn(logits.float(), targets.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


class _StepTimer(L.Callback):
    """Times training batches `warmup` to the last, syncing the GPU at those two points only (a
    sync every step would stall the queue of kernels and charge the framework for the timer)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            _sync(pl_module.device)
            self.end = time.perf_counter()  # validation is not timed
            self.steps = batch_idx + 1 - self.warmup

    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


def _trainer(device: torch.device, precision: str, timer: L.Callback, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=1,
        accelerator=device.type,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **kwargs,
    )


def our_step(
    name: str,
    batches: list,
    device: torch.device,
    warmup: int,
    precision: str,
    compiled: bool = False,
    channels_last: bool = True,
    benchmark: bool = True,
) -> float:
    """Seconds per step of cxrfusion's training step inside Lightning's Trainer."""
    torch.manual_seed(0)
    module = CxrClassifier(model=name, weights="none", channels_last=channels_last)
    if compiled:
        module.compile_model()
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    batch = len(batches[0][0])
    pin = device.type == "cuda"
    loader = DataLoader(TensorDataset(images, targets), batch_size=batch, pin_memory=pin)
    # One validation batch: the plateau schedule needs its metric (not timed).
    index = torch.arange(batch)
    val = DataLoader(TensorDataset(images[:batch], targets[:batch], index), batch_size=batch)
    timer = _StepTimer(warmup)
    _trainer(device, precision, timer, benchmark=benchmark).fit(module, loader, val)
    return timer.seconds_per_step()


def best_of(rounds: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each measure's fastest of `rounds`, the order rotating every round."""
    times: dict[str, list[float]] = {key: [] for key in measures}
    keys = list(measures)
    for round_ in range(rounds):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            times[key].append(measures[key]())
    return {key: min(values) for key, values in times.items()}


def make_prepared(folder: Path, images: int, side: int, val: int = 64) -> Path:
    """A prepared folder of random pixels: `images` training images, `val` each for val and test."""
    total = images + 2 * val
    names = [f"{i:08d}_000.png" for i in range(total)]
    array_path, manifest_path = cache_files(folder, side)
    folder.mkdir(parents=True, exist_ok=True)
    cache = np.lib.format.open_memmap(array_path, "w+", np.uint8, (total, side, side))
    block = np.random.default_rng(0).integers(0, 256, (min(total, 1024), side, side), np.uint8)
    for start in range(0, total, len(block)):
        cache[start : start + len(block)] = block[: total - start]
    cache.flush()
    del cache
    manifest = {"size": side, "fingerprint": "bench", "names": names, "failed": {}}
    write_atomic(manifest_path, json.dumps(manifest))
    labels = (np.random.default_rng(1).random((total, len(LABELS))) < 0.1).astype(int)
    split = pd.DataFrame(labels, columns=list(LABELS))
    split.insert(0, "split", ["train"] * images + ["val"] * val + ["test"] * val)
    split.insert(0, "Patient ID", np.arange(total))
    split.insert(0, "Image Index", names)
    write_split(split, folder)
    return folder


def data_path_step(
    name: str,
    prepared: Path,
    args: argparse.Namespace,
    batch: int,
    device: torch.device,
    precision: str,
    mode: str,
) -> float:
    """Seconds per step of our step fed from the cache by `CxrDataModule` (`cache_on_device`)."""
    torch.manual_seed(0)
    datasets = split_datasets(prepared, args.cache_size, args.size, Augmentation())
    data = CxrDataModule(datasets, batch, args.workers, 0, cache_on_device=mode)
    timer = _StepTimer(args.warmup)
    steps = args.warmup + args.steps
    trainer = _trainer(device, precision, timer, limit_train_batches=steps, benchmark=True)
    trainer.fit(CxrClassifier(model=name, weights="none"), datamodule=data)
    return timer.seconds_per_step()


def one_epoch(
    name: str, prepared: Path, out: Path, args: argparse.Namespace, batch: int, mode: str
) -> tuple[float, float]:
    """(seconds of the whole `train` call, seconds of its training batches) for one epoch."""
    timer = _StepTimer(warmup=0)
    make_trainer = fit._trainer

    def timed(*a, **kw) -> L.Trainer:
        trainer = make_trainer(*a, **kw)
        trainer.callbacks.append(timer)
        return trainer

    config = TrainConfig(
        prepared=str(prepared),
        out=str(out),
        model=name,
        weights="none",
        epochs=1,
        phase1_epochs=0,
        batch_size=batch,
        cache_size=args.cache_size,
        input_size=args.size,
        workers=args.workers,
        precision=args.precision,
        cache_on_device=mode,
    )
    fit._trainer = timed
    try:
        start = time.perf_counter()
        fit.train(config)
        return time.perf_counter() - start, timer.end - timer.start
    finally:
        fit._trainer = make_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"small CPU settings: {TINY}")
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed, 16-mixed")
    parser.add_argument(
        "--compile", choices=("off", "on", "both"), default="both", help="table 1's variants"
    )
    parser.add_argument("--prepared", type=Path, help="a prepared folder for tables 3 and 4")
    parser.add_argument("--cache-size", type=int, default=256, help="side of the cached images")
    parser.add_argument("--cache-images", type=int, default=4096, help="table 3's random cache")
    parser.add_argument(
        "--epoch-images", type=int, default=39242, help="table 4's training images (0: skip)"
    )
    parser.add_argument("--epoch-model", default="densenet121", help="table 4's model")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.epoch_model = "simple_cnn"
    # Tables, not Lightning's per-fit banners, tips and deprecation notices.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = fit._precision(args.precision)
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {where}; torch {torch.__version__}; input {args.size} px, {args.steps} timed "
        f"steps after {args.warmup}, best of {args.rounds} alternating rounds, precision "
        f"{precision}, {args.workers} loader workers"
    )
    compiled_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    print("\n1. steps, random batches in memory (img/s)")
    print(f"{'model':<18}{'batch':>6}{'mode':>10}{'bare':>10}{'ours':>10}{'ours/bare':>11}")
    for name in args.models:
        for batch in args.batches:
            batches = _batches(args.steps + args.warmup, batch, args.size)
            for compiled in compiled_modes:
                run = (name, batches, device, args.warmup, precision, compiled)
                measures = {"bare": partial(bare_loop, *run), "ours": partial(our_step, *run)}
                best = best_of(args.rounds, measures)
                mode = "compiled" if compiled else "eager"
                print(
                    f"{name:<18}{batch:>6}{mode:>10}{batch / best['bare']:>10.1f}"
                    f"{batch / best['ours']:>10.1f}{best['ours'] / best['bare']:>10.3f}x",
                    flush=True,
                )

    name, batch = args.models[0], args.batches[0]
    print(f"\n2. settings, {name} at batch {batch} (ours, img/s; ratio to the defaults)")
    batches = _batches(args.steps + args.warmup, batch, args.size)
    run = (name, batches, device, args.warmup, precision)
    settings = {
        "defaults (channels-last, cuDNN autotune, eager)": partial(our_step, *run),
        "channels-last off": partial(our_step, *run, channels_last=False),
        "cuDNN autotune off": partial(our_step, *run, benchmark=False),
        "compiled": partial(our_step, *run, compiled=True),
    }
    best = best_of(args.rounds, settings)
    base = best[next(iter(settings))]
    for label, seconds in best.items():
        print(f"{label:<50}{batch / seconds:>10.1f}{base / seconds:>8.2f}x", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="train_step_"))
    try:
        prepared = args.prepared or make_prepared(
            workdir / "cache", args.cache_images, args.cache_size
        )
        print(f"\n3. data paths, from the cache in {prepared} (ours, img/s)")
        print(f"{'model':<18}{'batch':>6}{'loader':>10}{'device':>10}{'device/loader':>15}")
        for name in args.models:
            for batch in args.batches:
                run = (name, prepared, args, batch, device, precision)
                paths = {mode: partial(data_path_step, *run, mode) for mode in ("off", "on")}
                best = best_of(args.rounds, paths)
                print(
                    f"{name:<18}{batch:>6}{batch / best['off']:>10.1f}{batch / best['on']:>10.1f}"
                    f"{best['off'] / best['on']:>14.2f}x",
                    flush=True,
                )
        if args.epoch_images:
            epoch_data = args.prepared or make_prepared(
                workdir / "epoch", args.epoch_images, args.cache_size
            )
            images = len(split_datasets(epoch_data, args.cache_size, args.size)["train"])
            batch = args.batches[0]
            print(
                f"\n4. one epoch of `train`, {args.epoch_model}, {images:,} training images, "
                f"batch {batch}"
            )
            print(f"{'data path':<12}{'whole run s':>12}{'training s':>12}{'training img/s':>16}")
            for mode in ("off", "on"):
                out = workdir / f"run_{mode}"
                whole, training = one_epoch(args.epoch_model, epoch_data, out, args, batch, mode)
                print(
                    f"{mode:<12}{whole:>12.1f}{training:>12.1f}{images / training:>16.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
