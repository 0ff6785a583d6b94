"""Grad-CAM heatmaps (pytorch-grad-cam) for any pathology of any cxrfusion model, and their figures.

Each model names its Grad-CAM layer (`gradcam_target_layers()`: the last CNN stage, or the fusion
network's attended map). The model is left exactly as it was found: train/eval flags,
`requires_grad` flags, accumulated gradients, and no hooks behind.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxrfusion.plotting import new_figure, save_figure

# Bytes of an image's stem kept in a figure's name: with the prefix, the hash and the writer's
# temporary name around it, well under the 255 bytes file systems allow in one name.
MAX_STEM_BYTES = 100


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter for the block (gradients flow to the input only), then restore the
    train/eval flags, requires_grad flags and `.grad` tensors that GradCAM's eval() and
    zero_grad() would otherwise change."""
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def gradcam(model: nn.Module, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM heatmap of one pathology for one image, computed in eval mode.

    Args:
        model: a cxrfusion model (`gradcam_target_layers()` names the layer to explain).
        x: one normalised image (1, 3, H, W) on the model's device.
        class_index: the output to explain (index into `cxrfusion.labels.LABELS`); an index
            beyond the model's outputs raises IndexError.

    Returns:
        Heatmap (H, W), float32 in [0, 1] (min-max scaled; all zero when nothing supports the
        class).
    """
    if x.dim() != 4 or len(x) != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(x.shape)}")
    if class_index < 0:
        raise ValueError(f"class_index must be >= 0, got {class_index}")
    # Grad-CAM needs autograd even when the caller runs under no_grad or inference_mode.
    with _untouched(model), torch.inference_mode(False), torch.enable_grad():
        image = x.detach().clone().requires_grad_(True)  # the graph hangs on the input alone
        cam = GradCAM(model=model, target_layers=model.gradcam_target_layers())
        try:
            heatmap = cam(input_tensor=image, targets=[ClassifierOutputTarget(class_index)])
        finally:
            # Not `with cam:`, whose __exit__ swallows IndexError (an out-of-range class).
            cam.activations_and_grads.release()
    return heatmap[0]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A jet-coloured heatmap blended over a grayscale radiograph.

    Args:
        image: grayscale radiograph (H, W), uint8.
        heatmap: values in [0, 1], any size (resized to the image, e.g. a 224-px CAM over the
            original 1024-px image).
        alpha: weight of the heatmap; 0 shows the image alone.

    Returns:
        RGB image (H, W, 3), uint8 (rescaled so that its brightest pixel is 255).
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be grayscale uint8 (H, W), got {image.dtype} {image.shape}")
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = image.shape
    if heatmap.shape != image.shape:
        heatmap = cv2.resize(heatmap.astype(np.float32), (width, height))
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32) / 255.0
    mask = np.clip(heatmap, 0.0, 1.0)
    return show_cam_on_image(rgb, mask, use_rgb=True, image_weight=1.0 - alpha)


def save_gradcam_figure(
    image: np.ndarray,
    heatmaps: Mapping[str, np.ndarray],
    probs: Mapping[str, float],
    path: Path,
) -> Path:
    """The radiograph, then one Grad-CAM overlay per pathology, most probable first.

    Args:
        image: grayscale radiograph (H, W), uint8.
        heatmaps: label -> heatmap in [0, 1] (e.g. from `gradcam` for the top predictions).
        probs: label -> predicted probability, for every label in `heatmaps`.
        path: output image (.png, .pdf, ...), written atomically.
    """
    missing = set(heatmaps) - set(probs)
    if missing:
        raise ValueError(f"no probability for {sorted(missing)}")
    labels = sorted(heatmaps, key=lambda label: -probs[label])
    figure = new_figure((3.2 * (len(labels) + 1), 3.6))
    axes = np.atleast_1d(figure.subplots(1, len(labels) + 1))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("radiograph", fontsize=9)
    for ax, label in zip(axes[1:], labels, strict=True):
        ax.imshow(overlay(image, heatmaps[label]))
        ax.set_title(f"{label}: p = {probs[label]:.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return save_figure(figure, Path(path))


def figure_name(prefix: str, source: str | Path) -> str:
    """The file name of an image's figure, `<prefix>_<stem>.png`, short enough for any file system.

    A stem over `MAX_STEM_BYTES` bytes (UTF-8) is cut, and 8 hex digits of its SHA-1 are added,
    so that images whose long names differ only at the end keep distinct figures.

    Args:
        prefix: what comes first (e.g. the image's index, zero-padded).
        source: the image's path or name; only its stem is used.
    """
    stem = os.fsencode(Path(source).stem)
    if len(stem) > MAX_STEM_BYTES:
        digest = hashlib.sha1(stem).hexdigest()[:8]
        stem = stem[: MAX_STEM_BYTES - len(digest) - 1] + b"_" + digest.encode()
    return f"{prefix}_{stem.decode('utf-8', 'ignore')}.png"
