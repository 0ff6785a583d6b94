"""Multi-label losses on logits, chosen by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel
from torchvision.ops import sigmoid_focal_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("focal", "bce", "asl")
ASL_NAN = "loss 'asl' cannot mask unknown (NaN) labels: use focal or bce"


def masked_mean(elementwise: LossFn) -> LossFn:
    """`elementwise(logits, targets)` averaged over the known targets only: a NaN target (a
    finding the image's dataset does not report) adds nothing to the loss or its gradient.
    Computed in float32 even under AMP: (1 - p) ** gamma of confident predictions underflows in
    fp16."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        values = elementwise(logits.float(), torch.nan_to_num(targets.float()))
        return (values * known).sum() / known.sum().clamp(min=1)

    return loss


def create_loss(name: str = "focal", alpha: float = 0.25, gamma: float = 2.0) -> LossFn:
    """A loss `fn(logits, targets) -> scalar`; targets may hold NaN (unknown, masked) except
    for "asl".

    Args:
        name: "focal" (the report's; torchvision's sigmoid focal loss, mean over the known
            elements), "bce" (binary cross-entropy, likewise) or "asl" (timm's asymmetric loss,
            summed as timm does; it has no per-element form to mask).
        alpha: focal weight of positives; 0.25 weights positives at 0.25 and negatives at 0.75
            (the RetinaNet convention), a negative value disables the weighting.
        gamma: focal exponent; 0 turns focal into (alpha-weighted) cross-entropy.
    """
    if name == "focal":
        return masked_mean(
            lambda logits, targets: sigmoid_focal_loss(
                logits, targets, alpha=alpha, gamma=gamma, reduction="none"
            )
        )
    if name == "bce":
        return masked_mean(
            lambda logits, targets: F.binary_cross_entropy_with_logits(
                logits, targets, reduction="none"
            )
        )
    if name == "asl":
        asl = AsymmetricLossMultiLabel()

        def asymmetric(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Checked on CPU tensors only: on a GPU the check would stall every training step
            # waiting for the answer; training checks its whole split once instead (fit._data).
            if targets.device.type == "cpu" and torch.isnan(targets).any():
                raise ValueError(ASL_NAN)
            return asl(logits, targets)

        return asymmetric
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
