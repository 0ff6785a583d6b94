"""From cached uint8 images to model input: the report's augmentations, resize, ImageNet normalisation.

The loader stays in uint8 (one OpenCV warp per image applies flip, rotation, zoom and the resize to the
model's input together); `normalize` turns a uint8 batch into 3-channel float input on the device,
which moves a quarter of the bytes to the GPU and keeps the loader far above 1,000 images/s per core.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads would fight them


def _warp_matrix(source: int, size: int, angle: float, scale: float, flip: bool) -> np.ndarray:
    """2x3 matrix mapping a source x source image onto size x size, about the centre."""
    s = scale * size / source
    cos, sin = s * math.cos(angle), s * math.sin(angle)
    sign = -1.0 if flip else 1.0
    centre_in, centre_out = (source - 1) / 2, (size - 1) / 2
    linear = np.array([[sign * cos, -sin], [sign * sin, cos]])
    offset = centre_out - linear @ np.array([centre_in, centre_in])
    return np.hstack([linear, offset[:, None]])


def augment(
    images: np.ndarray, size: int, augmentation: Augmentation, draws: np.ndarray | None = None
) -> np.ndarray:
    """Randomly flip, rotate, zoom and brighten a uint8 batch (B, S, S) into (B, size, size).

    Args:
        draws: (B, 4) uniform numbers in [-1, 1] per image (angle, zoom, flip, brightness), e.g.
            seeded per image by the dataset; None draws them from torch's global RNG.
    """
    if draws is None:
        draws = torch.rand(len(images), 4, dtype=torch.float64).numpy() * 2 - 1
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for image, (u_angle, u_zoom, u_flip, u_bright), target in zip(images, draws, out, strict=True):
        matrix = _warp_matrix(
            image.shape[-1],
            size,
            angle=u_angle * math.radians(augmentation.rotate_deg),
            scale=1 + u_zoom * augmentation.zoom,
            flip=(u_flip + 1) / 2 < augmentation.flip,
        )
        cv2.warpAffine(image, matrix, (size, size), dst=target, flags=cv2.INTER_LINEAR)
        cv2.convertScaleAbs(target, dst=target, alpha=1 + u_bright * augmentation.brightness)
    return out


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 batch (B, S, S) to (B, size, size) without augmentation (evaluation)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return np.ascontiguousarray(images)
    return np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA) for i in images])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch (B, 1, H, W) -> float (B, 3, H, W) normalised for ImageNet backbones."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected uint8 (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def check_model_input(x: torch.Tensor) -> None:
    """Refuse float input that was not normalised the way the models were trained.

    Silently wrong input ranges (0..255 floats, or un-normalised 0..1) are the most reported failure
    of chest X-ray toolkits: they give confident nonsense. Normalised input lies in about [-2.2, 2.7].
    """
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    lo, hi = float(x.min()), float(x.max())
    if lo < low - 1e-3 or hi > high + 1e-3:
        raise CxrError(
            f"model input range [{lo:.2f}, {hi:.2f}] is outside the normalised range "
            f"[{low:.2f}, {high:.2f}]: pass uint8 images through normalize()"
        )
    if hi - lo < 0.05:
        raise CxrError(f"model input is nearly constant ([{lo:.3f}, {hi:.3f}]): blank image?")
