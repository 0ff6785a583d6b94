"""Multi-label losses on logits, chosen by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel
from torchvision.ops import sigmoid_focal_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("focal", "bce", "asl")


def create_loss(name: str = "focal", alpha: float = 0.25, gamma: float = 2.0) -> LossFn:
    """A loss `fn(logits, targets) -> scalar`.

    Args:
        name: "focal" (the report's; torchvision's sigmoid focal loss, mean over all elements,
            computed in float32 under mixed precision),
            "bce" (binary cross-entropy) or "asl" (timm's asymmetric loss, summed as timm does).
        alpha: focal weight of positives; 0.25 weights positives at 0.25 and negatives at 0.75
            (the RetinaNet convention), a negative value disables the weighting.
        gamma: focal exponent; 0 turns focal into (alpha-weighted) cross-entropy.
    """
    if name == "focal":

        def focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # float32 even under AMP: (1 - p) ** gamma of confident predictions underflows in fp16
            return sigmoid_focal_loss(
                logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="mean"
            )

        return focal
    if name == "bce":
        return F.binary_cross_entropy_with_logits
    if name == "asl":
        return AsymmetricLossMultiLabel()
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
