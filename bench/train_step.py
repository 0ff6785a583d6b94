"""Training images/s per model, and the overhead of our Lightning training step over a bare loop.

Both run side by side in this one process on the same model, data and device:
  bare:  normalize > forward > focal loss > backward > Adam step, in a plain PyTorch loop;
  ours:  `cxrfusion.training` (CxrClassifier in Lightning's Trainer, callbacks, checkpoint IO off).
The ratio ours/bare is the overhead of the framework (target <= 1.05x). They alternate for
`--rounds` rounds (bare first, then ours first, ...) and each keeps its fastest round, so neither
gains from running second on a warm machine.

    .venv/bin/python bench/train_step.py [--models simple_cnn fusion] [--size 224] [--batch 32]
        [--precision auto|32-true|bf16-mixed|16-mixed]

`--precision auto` is what `cxrfusion train` uses: bf16 AMP on a GPU that has it, fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxrfusion.data.transforms import normalize
from cxrfusion.models import create_model, list_models
from cxrfusion.training.fit import _precision
from cxrfusion.training.losses import create_loss
from cxrfusion.training.module import CxrClassifier


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


def bare_loop(name: str, batches: list, device: torch.device, warmup: int, precision: str) -> float:
    """Seconds per step of the plainest loop that trains the same model the same way."""
    torch.manual_seed(0)
    model = create_model(name).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = create_loss("focal")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    for step, (images, targets) in enumerate(batches):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        x = normalize(images.to(device)).contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            logits = model(x)
        loss = loss_fn(logits.float(), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Only the last batch waits for the GPU, as the bare loop does: a sync every step would
        # stall the queue of kernels and charge the framework for the timer.
        if batch_idx == trainer.num_training_batches - 1:
            _sync(pl_module.device)
            self.end = time.perf_counter()  # validation is not timed


def our_step(name: str, batches: list, device: torch.device, warmup: int, precision: str) -> float:
    """Seconds per step of cxrfusion's training step inside Lightning's Trainer."""
    torch.manual_seed(0)
    module = CxrClassifier(model=name, weights="none")
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    batch = len(batches[0][0])
    loader = DataLoader(TensorDataset(images, targets), batch_size=batch)
    # One validation batch: the plateau schedule needs its metric (not timed).
    index = torch.arange(batch)
    val = DataLoader(TensorDataset(images[:batch], targets[:batch], index), batch_size=batch)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
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
    )
    trainer.fit(module, loader, val)
    return (timer.end - timer.start) / (len(batches) - warmup)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models())
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed, 16-mixed")
    args = parser.parse_args()
    # A table, not Lightning's per-fit banners, tips and deprecation notices.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = _precision(args.precision)
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {where}; input {args.size}px, batch {args.batch}, {args.steps} timed steps, "
        f"best of {args.rounds} alternating rounds, precision {precision}"
    )
    print(f"{'model':<18}{'bare img/s':>12}{'ours img/s':>12}{'ours/bare':>11}")
    batches = _batches(args.steps + args.warmup, args.batch, args.size)
    for name in args.models:
        times = {bare_loop: [], our_step: []}
        for round_ in range(args.rounds):
            order = (bare_loop, our_step) if round_ % 2 == 0 else (our_step, bare_loop)
            for measure in order:
                times[measure].append(measure(name, batches, device, args.warmup, precision))
        bare, ours = min(times[bare_loop]), min(times[our_step])
        print(
            f"{name:<18}{args.batch / bare:>12.1f}{args.batch / ours:>12.1f}{ours / bare:>10.3f}x"
        )


if __name__ == "__main__":
    main()
