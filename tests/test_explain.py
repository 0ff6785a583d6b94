"""Specifications of Grad-CAM heatmaps, overlays and figures, on a model with known evidence and
on every registered model."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrfusion.explain import gradcam, overlay, save_gradcam_figure
from cxrfusion.models import create_model, list_models

HEIGHT, WIDTH = 24, 40  # not square: a swapped H/W would show
REGION = (slice(0, 8), slice(24, 40))  # top right


class RegionSplit(nn.Module):
    """(B, 3, H, W) -> (B, 2, H, W): channel 0 is the image inside REGION, channel 1 outside."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, HEIGHT, WIDTH)
        mask[..., REGION[0], REGION[1]] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.mean(dim=1, keepdim=True)
        return torch.cat([gray * self.mask, gray * (1 - self.mask)], dim=1)


class RegionNet(nn.Module):
    """Class 0 scores the mean brightness of REGION, class 1 of the rest; classes 2-13 are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.split = RegionSplit()
        self.features = nn.Sequential(self.split, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 14))
        with torch.no_grad():
            self.head[1].weight.zero_()
            self.head[1].bias.zero_()
            self.head[1].weight[0, 0] = self.head[1].weight[1, 1] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def gradcam_target_layers(self) -> list[nn.Module]:
        return [self.split]


def _bright_image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return 0.5 + torch.rand(1, 3, HEIGHT, WIDTH, generator=generator)


def _region_mask() -> np.ndarray:
    inside = np.zeros((HEIGHT, WIDTH), dtype=bool)
    inside[REGION] = True
    return inside


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_heatmap_lights_exactly_the_region_the_class_score_reads() -> None:
    heatmap = gradcam(RegionNet(), _bright_image(), class_index=0)
    inside = _region_mask()
    assert heatmap.shape == (HEIGHT, WIDTH)
    assert heatmap[inside].min() > 0.2 and heatmap.max() == pytest.approx(1.0, abs=1e-6)
    assert heatmap[~inside].max() == 0.0


def test_heatmap_follows_the_requested_class() -> None:
    heatmap = gradcam(RegionNet(), _bright_image(), class_index=1)
    inside = _region_mask()
    assert heatmap[inside].max() == 0.0 and heatmap[~inside].min() > 0.2


def test_gradcam_works_when_the_caller_is_in_inference_mode() -> None:
    model, x = RegionNet(), _bright_image()
    with torch.inference_mode():
        heatmap = gradcam(model, x, class_index=0)
    assert heatmap[_region_mask()].min() > 0.2


def test_bad_requests_raise_and_leave_no_hooks() -> None:
    model = RegionNet()
    with pytest.raises(IndexError):
        gradcam(model, _bright_image(), class_index=14)
    with pytest.raises(ValueError, match="one image"):
        gradcam(model, torch.cat([_bright_image()] * 2), class_index=0)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(model, _bright_image(), class_index=-1)
    assert _hooks(model) == 0


@pytest.fixture(scope="module", params=list_models())
def model(request: pytest.FixtureRequest) -> nn.Module:
    return create_model(request.param)


def test_gradcam_on_every_model_keeps_the_model_as_it_was(model: nn.Module) -> None:
    # Fusion's smallest grid with more than one cell: 64 px (DenseNet stride 32 -> 2x2).
    size = 64
    if getattr(model, "has_backbone", False):
        model.freeze_backbone(True)  # phase 1 state: mixed requires_grad and train flags
    model.train()
    parameter = next(p for p in model.parameters() if p.requires_grad)
    parameter.grad = torch.ones_like(parameter)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    heatmap = gradcam(model, x, class_index=4)

    assert heatmap.shape == (size, size) and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(parameter.grad, torch.ones_like(parameter))
    assert all(
        p.grad is None for p in model.parameters() if p is not parameter
    )  # no weight gradients
    for key, value in model.state_dict().items():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(value, state[key]), key
    assert _hooks(model) == 0


def test_overlay_is_rgb_uint8_and_red_where_the_heatmap_is_hot() -> None:
    image = np.full((32, 48), 128, dtype=np.uint8)
    heatmap = np.zeros((16, 24), dtype=np.float32)  # half size: resized to the image
    heatmap[:, 12:] = 1.0
    rgb = overlay(image, heatmap, alpha=0.5)
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[16, 40].astype(int), rgb[16, 4].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]


def test_overlay_with_zero_alpha_is_the_gray_image() -> None:
    image = np.random.default_rng(0).integers(1, 256, (16, 16), dtype=np.uint8)
    image[0, 0] = 255  # show_cam_on_image rescales to the brightest pixel
    rgb = overlay(image, np.random.default_rng(1).random((16, 16)), alpha=0.0)
    for channel in range(3):
        np.testing.assert_allclose(rgb[..., channel], image, atol=1)


def test_overlay_refuses_a_float_image() -> None:
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((8, 8)), np.zeros((8, 8)))


def test_gradcam_figure_is_written_with_a_panel_per_label(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    heatmaps = {"Effusion": np.eye(64), "Nodule": np.eye(64)[::-1]}
    path = save_gradcam_figure(
        image, heatmaps, {"Effusion": 0.8, "Nodule": 0.3}, tmp_path / "g.png"
    )
    with Image.open(path) as figure:
        width, height = figure.size
    assert width > 2.5 * height  # three panels side by side
    assert plt.get_fignums() == []
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_gradcam_figure_needs_a_probability_per_heatmap(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Nodule"):
        save_gradcam_figure(
            np.zeros((8, 8), np.uint8), {"Nodule": np.zeros((8, 8))}, {}, tmp_path / "g.png"
        )
