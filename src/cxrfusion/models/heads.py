"""Any timm backbone with the report's classification head (DenseNet121, EfficientNetB0, ...)."""

from __future__ import annotations

import timm
from torch import nn

from cxrfusion.labels import NUM_LABELS
from cxrfusion.models.base import CxrModel, remove_inert_dropout
from cxrfusion.models.registry import register_model


class TimmClassifier(CxrModel):
    """timm backbone > global average pool > dropout > dense 512 ReLU > dropout > dense classes.

    Both dropouts are in `head` (the first one is the MC-dropout layer), so `features` is the
    timm backbone alone, pooled. With 14 classes the head has 531,982 parameters on DenseNet121
    (1024 features) and 663,054 on EfficientNetB0 (1280), as in the report. Inputs are normalised
    with the backbone's own `pretrained_cfg` mean/std (ImageNet's for most, 0.5/0.5 for ViTs and
    Inception), the statistics its pretrained weights expect.

    Args:
        backbone: timm model name, e.g. "densenet121", "convnext_tiny".
        num_classes: number of output logits.
        hidden: width of the hidden dense layer.
        dropout: drop probability of both dropout layers (0.4 in the report).
        timm_kwargs: passed to `timm.create_model` (e.g. `drop_path_rate`).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = NUM_LABELS,
        hidden: int = 512,
        dropout: float = 0.4,
        **timm_kwargs: object,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        net = timm.create_model(backbone, num_classes=0, global_pool="avg", **timm_kwargs)
        remove_inert_dropout(net)
        width = getattr(net, "head_hidden_size", None) or net.num_features
        head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        cfg = net.pretrained_cfg
        super().__init__(net, head, num_features=width, mean=cfg["mean"], std=cfg["std"])
        self.backbone_name = backbone

    def backbones(self) -> dict[str, nn.Module]:
        return {self.backbone_name: self.features}

    def gradcam_target_layers(self) -> list[nn.Module]:
        """The backbone's last feature stage (timm `feature_info`): DenseNet's final norm,
        EfficientNet's last block stage, a ResNet's layer4. Convolutional backbones only."""
        return [self.features.get_submodule(self.features.feature_info[-1]["module"])]


@register_model("densenet121")
def densenet121(num_classes: int = NUM_LABELS, **kwargs: object) -> TimmClassifier:
    """DenseNet121 with the report's head (1024 features)."""
    return TimmClassifier("densenet121", num_classes=num_classes, **kwargs)


@register_model("efficientnet_b0")
def efficientnet_b0(num_classes: int = NUM_LABELS, **kwargs: object) -> TimmClassifier:
    """EfficientNetB0 with the report's head (1280 features)."""
    return TimmClassifier("efficientnet_b0", num_classes=num_classes, **kwargs)
