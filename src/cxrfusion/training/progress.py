"""What a person reads while a model trains: Lightning's bar on a terminal, one line per epoch in a log."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from cxrfusion.training.module import MONITOR

BAR_REFRESH_STEPS = 10


class EpochLines(ProgressBar):
    """One line per epoch, for output that is not a terminal: a bar's redraws would fill the log.

    e.g. `epoch 3/12  phase 2  train_loss 0.1234  val_loss 0.1187  val_auc 0.8123  lr 1e-05  14.2 s`
    (phase 1: backbone frozen; the time covers training and validation).
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._start = time.perf_counter()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        fields = [
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
            f"phase {1 if pl_module.backbone_frozen else 2}",
        ]
        for key, name in (
            ("train_loss", "train_loss"),
            ("val_loss", "val_loss"),
            (MONITOR, "val_auc"),
        ):
            if key in metrics:
                fields.append(f"{name} {float(metrics[key]):.4f}")
        fields.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        fields.append(f"{time.perf_counter() - self._start:.1f} s")
        self.print("  ".join(fields), file=sys.stdout, flush=True)


def progress_bar() -> ProgressBar:
    """Lightning's tqdm bar when stdout is a terminal, else `EpochLines`.

    The bar redraws every `BAR_REFRESH_STEPS` steps (and at each epoch's end): Lightning's default
    redraws and reads its metrics on every step, a host-side cost per step the eye cannot use at
    tens of steps a second.
    """
    return TQDMProgressBar(refresh_rate=BAR_REFRESH_STEPS) if sys.stdout.isatty() else EpochLines()
