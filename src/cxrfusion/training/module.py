"""What is learned: the model, its loss, the validation metrics and the optimiser (Lightning module)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cxrfusion.data.transforms import normalize
from cxrfusion.labels import LABELS
from cxrfusion.models import create_model
from cxrfusion.stats.metrics import macro_auc, per_class_auc
from cxrfusion.training.losses import create_loss

MONITOR = "val_auc_macro"


class CxrClassifier(L.LightningModule):
    """A multi-label classifier trained on uint8 radiographs; `forward` returns logits.

    Args:
        model: registry name (simple_cnn, densenet121, efficientnet_b0, fusion or a timm name).
        weights: "imagenet", "none" or a local weights file (see `cxrfusion models --help`).
        loss: "focal", "bce" or "asl"; focal_alpha / focal_gamma tune the focal loss.
        lr: learning rate of phase 1 (the whole run for models without a pretrained backbone).
        min_lr: floor of the reduce-on-plateau schedule.
        plateau_patience / plateau_factor: epochs without a better validation AUC before the
            learning rate is multiplied by the factor.
        channels_last: NHWC memory layout (faster convolutions on CPU and tensor cores).
    """

    def __init__(
        self,
        model: str = "simple_cnn",
        weights: str = "none",
        loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        plateau_patience: int = 2,
        plateau_factor: float = 0.1,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=len(LABELS), weights=weights)
        self.loss_fn = create_loss(loss, focal_alpha, focal_gamma)
        self.backbone_frozen = False
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self._memory_format)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 radiographs (B, 1, H, W) -> logits (B, 14)."""
        x = normalize(images, self.model.mean, self.model.std)
        return self.model(x.contiguous(memory_format=self._memory_format))

    def compile_model(self, **options: object) -> None:
        """`torch.compile` the model in place (`nn.Module.compile`): its calls run compiled, its
        parameters and state-dict keys stay the same, so checkpoints load with or without it.

        Only `model(x)` is compiled; normalisation runs before it, eagerly. A phase switch or
        validation (eval mode) compiles once more, then the graphs are reused.

        Args:
            options: `torch.compile`'s keyword arguments (default backend: inductor).
        """
        self.model.compile(**options)

    def freeze_backbone(self, frozen: bool) -> None:
        """Phase 1 trains the head alone (the model keeps frozen BatchNorm statistics too)."""
        self.backbone_frozen = frozen and self.model.has_backbone
        self.model.freeze_backbone(self.backbone_frozen)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """One step that never waits for the device: the loss is accumulated on the device by
        Lightning and read once per epoch (logged per epoch only, never per step, so no step
        turns a device tensor into a Python float)."""
        images, targets = batch[0], batch[1]
        loss = self.loss_fn(self(images), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, targets, indices = batch
        logits = self(images)
        self.log("val_loss", self.loss_fn(logits, targets), on_epoch=True, sync_dist=True)
        self._val_outputs.append((torch.sigmoid(logits.float()), targets, indices))

    def on_validation_epoch_end(self) -> None:
        probs, targets = self._gather_unique(self._val_outputs)
        self._val_outputs.clear()
        aucs = per_class_auc(targets, probs)  # NaN for a class without positives, never 0
        # every process computed the same value from the gathered predictions: "max" keeps it exact
        same = dict(sync_dist=True, reduce_fx="max")
        self.log(MONITOR, float(np.nan_to_num(macro_auc(aucs), nan=0.5)), prog_bar=True, **same)
        for name, auc in zip(LABELS, aucs, strict=True):
            self.log(f"val_auc/{name}", float(auc), **same)

    def _gather_unique(self, outputs: list) -> tuple[np.ndarray, np.ndarray]:
        """All validation predictions across processes, each image once.

        A distributed sampler pads the last batch with repeated images, which would shift the AUC
        with the number of GPUs; the dataset index of every sample lets us drop the repeats.
        """
        probs, targets, indices = (torch.cat(part) for part in zip(*outputs, strict=True))
        if self.trainer.world_size > 1:
            probs, targets, indices = (
                self.all_gather(t).flatten(0, 1) for t in (probs, targets, indices)
            )
        _, first = np.unique(indices.cpu().numpy(), return_index=True)
        return probs.cpu().numpy()[first], targets.cpu().numpy()[first]

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)
        scheduler = ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=self.hparams.plateau_factor,
            patience=self.hparams.plateau_patience,
            min_lr=self.hparams.min_lr,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR, "interval": "epoch"},
        }

    def on_train_epoch_end(self) -> None:
        """Step the plateau schedule now, before the epoch's checkpoint is written.

        Lightning steps epoch schedulers after its end-of-epoch checkpoint, so a run resumed from
        that checkpoint would miss one step and drift from the uninterrupted run.
        """
        self.lr_schedulers().step(self.trainer.callback_metrics[MONITOR])

    def lr_scheduler_step(self, scheduler: ReduceLROnPlateau, metric: object) -> None:
        """A no-op: `on_train_epoch_end` has stepped the schedule already."""
