"""The one interface every cxrfusion model has: deterministic features, then a head with all dropout."""

from __future__ import annotations

import abc
from collections.abc import Iterator

import torch
from torch import nn

from cxrfusion.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Triple


class CxrModel(nn.Module, abc.ABC):
    """A multi-label classifier whose `forward(x) = head(features(x))` returns logits (B, classes).

    `features` is everything before the first dropout layer: deterministic in eval mode, holds
    every BatchNorm, maps images (B, 3, H, W) to vectors (B, num_features). `head` holds ALL the
    dropout, so MC dropout runs `features` once and samples `head` T times.

    Phase 1 of training freezes the pretrained backbone(s): `freeze_backbone(True)` turns their
    gradients off AND keeps them in eval mode through every later `train()` call, so their
    BatchNorm running statistics stay the pretrained ones (Keras' `trainable=False`, as in the
    report). Training code needs to do nothing else.

    `mean` / `std` are the per-channel normalisation the model expects on the 0..1 scale (timm's
    `pretrained_cfg` for a timm backbone): training, evaluation and inference all normalise with
    them (`transforms.normalize(images, model.mean, model.std)`).

    Args:
        features: module mapping images (B, 3, H, W) to vectors (B, num_features).
        head: module mapping those vectors to logits; the only place dropout may live.
        num_features: width F of the feature vector.
        mean / std: the input normalisation (default ImageNet's).
    """

    def __init__(
        self,
        features: nn.Module,
        head: nn.Module,
        num_features: int,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.num_features = num_features
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values (std > 0), got {mean} / {std}")
        self._backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), normalised floats -> logits (B, num_classes)."""
        return self.head(self.features(x))

    def backbones(self) -> dict[str, nn.Module]:
        """The pretrained timm backbone(s) inside `features`, by timm model name ({} if none)."""
        return {}

    @property
    def has_backbone(self) -> bool:
        """Whether training has a phase 1 (frozen pretrained backbone) at all."""
        return bool(self.backbones())

    def backbone_modules(self) -> list[nn.Module]:
        """The backbone modules, in `backbones()` order."""
        return list(self.backbones().values())

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters frozen in phase 1."""
        for backbone in self.backbone_modules():
            yield from backbone.parameters()

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Turn the backbone's gradients off (phase 1) or on (phase 2); see the class docstring.

        Args:
            frozen: True keeps the backbone fixed, in eval mode, until called with False.
        """
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not frozen)
        self._backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> CxrModel:
        super().train(mode)
        if self._backbone_frozen:  # frozen BatchNorm must not update its running statistics
            for backbone in self.backbone_modules():
                backbone.eval()
        return self

    @abc.abstractmethod
    def gradcam_target_layers(self) -> list[nn.Module]:
        """The layer(s) whose 4-D activation map (B, C, h, w) Grad-CAM should weight."""


def remove_inert_dropout(module: nn.Module) -> None:
    """Replace zero-probability dropout modules (timm's unused `head_drop`) by `nn.Identity`.

    Keeps the contract that every dropout module sits in the head, where MC dropout looks.

    Args:
        module: a backbone, changed in place; active dropout in it (p > 0) is a ValueError,
            because it would make `features` random.
    """
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.modules.dropout._DropoutNd):
            if child.p > 0:
                raise ValueError(f"dropout {name!r} (p={child.p}) belongs in the head")
            module.set_submodule(name, nn.Identity())


def count_parameters(model: CxrModel) -> dict[str, int]:
    """Parameter counts: `total`, `phase1_trainable` (backbone frozen), `phase2_trainable` (all).

    Args:
        model: any model from `create_model`; its current requires_grad flags are not consulted.
    """
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in {id(p): p for p in model.backbone_parameters()}.values())
    return {"total": total, "phase1_trainable": total - backbone, "phase2_trainable": total}
