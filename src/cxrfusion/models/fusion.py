"""The Dense-Efficient Attention-Fusion Network: two CNNs' feature maps, fused by attention."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import SEModule
from torch import nn

from cxrfusion.labels import NUM_LABELS
from cxrfusion.models.base import CxrModel, remove_inert_dropout
from cxrfusion.models.registry import register_model

# (timm name, feature_info index): DenseNet121 whole (final norm, 1024 ch, stride 32) and
# EfficientNetB3 through blocks.4 (136 ch, stride 16); their later layers are pruned away.
DEFAULT_TAPS: tuple[tuple[str, int], ...] = (("densenet121", 4), ("efficientnet_b3", 3))


class SpatialChannelAttention(nn.Module):
    """Self-attention over the H*W spatial positions, then channel squeeze-excitation.

    Each position of the (B, C, H, W) map is a C-dimensional token. A pre-norm residual step,
    `x + MultiheadAttention(LayerNorm(x))` with `num_heads` heads (no dropout, no positional
    encoding: zero padding already makes conv features position-aware, and any input size
    works), lets every position attend to every other. Squeeze-excitation (`timm.layers.SEModule`,
    C > C/16 > C, sigmoid gate) then reweights the channels. Output: the attended map, same shape.

    Args:
        channels: C, the token width; must be divisible by num_heads.
        num_heads: attention heads.
    """

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.se = SEModule(channels, rd_ratio=1 / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        normed = self.norm(tokens)
        tokens = tokens + self.attn(normed, normed, normed, need_weights=False)[0]
        return self.se(tokens.transpose(1, 2).reshape(b, c, h, w))


def _tapped_backbone(name: str, index: int) -> nn.Module:
    """A timm model cut right after feature map `index` (`prune_intermediate_layers`).

    Cutting matters: `features_only` keeps EfficientNet's later blocks, which would then count as
    (and train as) parameters that never reach the output.
    """
    net = timm.create_model(name, num_classes=0)
    net.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
    remove_inert_dropout(net)
    return net


class FusionFeatures(nn.Module):
    """Backbone maps > 1x1 conv to `proj_channels` each > one grid > concat > attention > GAP.

    The grid is the coarsest of the maps (the smallest H*W; DenseNet's 7x7 at 224 input); finer
    maps are resized to it bilinearly (for the default taps a 2x downsampling, i.e. a 2x2 mean).

    Args:
        taps: (timm name, feature_info index) per backbone; names must differ.
        proj_channels: channels of each projected map; the attention width is their sum.
        num_heads: attention heads.
    """

    def __init__(
        self, taps: Sequence[tuple[str, int]], proj_channels: int = 256, num_heads: int = 8
    ) -> None:
        super().__init__()
        self.names = tuple(name for name, _ in taps)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"fusion backbones must differ, got {self.names}")
        self.indices = tuple(index for _, index in taps)
        self.backbones = nn.ModuleList(_tapped_backbone(n, i) for n, i in taps)
        self.projections = nn.ModuleList(
            nn.Conv2d(net.feature_info[i]["num_chs"], proj_channels, 1)
            for net, i in zip(self.backbones, self.indices, strict=True)
        )
        self.attention = SpatialChannelAttention(proj_channels * len(taps), num_heads)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [
            project(net.forward_intermediates(x, indices=[index], intermediates_only=True)[0])
            for net, index, project in zip(
                self.backbones, self.indices, self.projections, strict=True
            )
        ]
        grid = min((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
        maps = [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear")
            for m in maps
        ]
        return self.pool(self.attention(torch.cat(maps, dim=1)))


@register_model("fusion")
class FusionNet(CxrModel):
    """Dense-Efficient Attention-Fusion Network: DenseNet121 + EfficientNetB3, attention-fused.

    `features` (`FusionFeatures`): DenseNet121's final map (1024 ch, stride 32) and EfficientNetB3's
    blocks.4 map (136 ch, stride 16), each projected to 256 channels by a 1x1 conv, the latter
    resized bilinearly to the former's grid (7x7 tokens at 224 input), concatenated (512 ch),
    refined by `SpatialChannelAttention` (8-head self-attention over the 49 positions, pre-norm
    LayerNorm, residual; then channel squeeze-excitation), global average pooled. `head`:
    dropout 0.5 > dense classes. With 14 classes: 10,533,624 parameters (report: 10,638,528,
    -1.0 %), of which 1,389,614 train in phase 1 (everything but the two backbones). Both
    backbones share one input, so they must share a normalisation: that of their timm
    `pretrained_cfg` (ImageNet's for the default pair); backbones that disagree are refused.

    Args:
        num_classes: number of output logits.
        taps: (timm name, feature_info index) per backbone, to swap backbones or taps.
        proj_channels: channels of each projected map.
        num_heads: attention heads.
        dropout: drop probability before the last dense layer (the MC-dropout layer).
    """

    def __init__(
        self,
        num_classes: int = NUM_LABELS,
        taps: Sequence[tuple[str, int]] = DEFAULT_TAPS,
        proj_channels: int = 256,
        num_heads: int = 8,
        dropout: float = 0.5,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        features = FusionFeatures(taps, proj_channels, num_heads)
        width = proj_channels * len(taps)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        stats = {
            (tuple(net.pretrained_cfg["mean"]), tuple(net.pretrained_cfg["std"]))
            for net in features.backbones
        }
        if len(stats) != 1:
            raise ValueError(f"fusion backbones {features.names} expect different normalisations")
        mean, std = stats.pop()
        super().__init__(features, head, num_features=width, mean=mean, std=std)

    def backbones(self) -> dict[str, nn.Module]:
        return dict(zip(self.features.names, self.features.backbones, strict=True))

    def gradcam_target_layers(self) -> list[nn.Module]:
        """The fused, attended map (B, 512, h, w) just before pooling."""
        return [self.features.attention]
