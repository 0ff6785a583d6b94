"""How training runs, beyond Lightning's defaults: the two phases, per-epoch metrics, atomic checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cxrfusion.atomic import atomic_path, write_atomic
from cxrfusion.training.curves import plot_loss_curves


class TwoPhaseTraining(L.Callback):
    """Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes all layers at a low rate.

    The phase is a function of the epoch alone, so a resumed run lands in the right one. The
    frozen backbone keeps its BatchNorm in eval mode (`CxrModel.freeze_backbone`); at the switch
    every parameter group moves to `phase2_lr` and the plateau and early-stopping counters start
    afresh.

    Why not Lightning's `BaseFinetuning`: it freezes in its `setup` hook, before the strategy wraps
    the model in DDP, and DDP registers only the parameters that require gradients at that moment,
    so a backbone unfrozen in phase 2 would train on each process's own gradients, never averaged:
    the replicas would silently drift apart. Here every parameter is registered (the freeze happens
    at the start of each epoch, after wrapping) and DDP runs with `find_unused_parameters` for runs
    with a phase 1 (`launch.ddp_strategy`); Adam skips the frozen parameters, whose gradients stay
    None, and keeps one parameter group, so checkpoints resume in either phase.

    Args:
        phase1_epochs: epochs with the backbone frozen (0 skips phase 1).
        phase2_lr: learning rate of every parameter from the first phase-2 epoch on.
    """

    def __init__(self, phase1_epochs: int, phase2_lr: float) -> None:
        self.phase1_epochs = phase1_epochs
        self.phase2_lr = phase2_lr

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        pl_module.freeze_backbone(epoch < self.phase1_epochs)
        if epoch == self.phase1_epochs > 0 and pl_module.model.has_backbone:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.phase2_lr
            for config in trainer.lr_scheduler_configs:  # a fresh plateau count for the new phase
                config.scheduler.best = config.scheduler.mode_worse
                config.scheduler.num_bad_epochs = 0
            for callback in trainer.callbacks:
                if isinstance(callback, EarlyStopping):
                    callback.wait_count = 0


class EpochMetrics(L.Callback):
    """Writes run_dir/metrics.csv (one row per epoch) and the loss-curve figure after every epoch."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        path = self.run_dir / "metrics.csv"
        history = pd.read_csv(path) if path.exists() else pd.DataFrame()
        history = history[history["epoch"] < trainer.current_epoch] if len(history) else history
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "phase": 1 if pl_module.backbone_frozen else 2,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        row.update({k: float(v) for k, v in sorted(trainer.callback_metrics.items())})
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        write_atomic(path, history.to_csv(index=False))
        plot_loss_curves(history, self.run_dir / "loss_curves.png")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written under a temporary name and renamed: a kill never leaves half a file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        with atomic_path(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
