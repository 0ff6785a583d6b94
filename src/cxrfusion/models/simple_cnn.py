"""The report's baseline (its Figure 3a): three conv/pool stages, global pooling, two dense layers."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from cxrfusion.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cxrfusion.labels import NUM_LABELS
from cxrfusion.models.base import CxrModel
from cxrfusion.models.registry import register_model


def _conv_stage(stage: int, in_channels: int, out_channels: int) -> dict[str, nn.Module]:
    return {
        f"conv{stage}": nn.Conv2d(in_channels, out_channels, 3, padding=1),
        f"relu{stage}": nn.ReLU(),
        f"pool{stage}": nn.MaxPool2d(2),
    }


@register_model("simple_cnn")
class SimpleCNN(CxrModel):
    """conv3x3 32 > pool > conv3x3 64 > pool > conv3x3 128 > pool > GAP > dense 256 > dense 14.

    129,870 parameters with 3 input channels and 14 classes, as in the report. It has no dropout,
    so its MC-dropout standard deviation is exactly zero, and no pretrained backbone, so it trains
    in one phase. `features` ends after global pooling (128 values); `head` is the two dense layers.
    Trained from scratch, any fixed normalisation serves; it keeps ImageNet's, explicitly, so
    that its input range matches the other models' (and runs trained before this choice).

    Args:
        num_classes: number of output logits.
        in_chans: input channels (3: the grayscale radiograph repeated, like the other models).
    """

    def __init__(self, num_classes: int = NUM_LABELS, in_chans: int = 3) -> None:
        features = nn.Sequential(
            OrderedDict(
                **_conv_stage(1, in_chans, 32),
                **_conv_stage(2, 32, 64),
                **_conv_stage(3, 64, 128),
                gap=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
            )
        )
        head = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, num_classes))
        super().__init__(features, head, num_features=128, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def gradcam_target_layers(self) -> list[nn.Module]:
        """The last conv stage's activation, before its pooling (the finest 128-channel map)."""
        return [self.features.relu3]
