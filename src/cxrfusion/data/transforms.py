"""From uint8 images to model input: the report's augmentations, the resize, the model's normalisation.

The loader stays in uint8 (one OpenCV warp per image applies flip, rotation, zoom and the resize to the
model's input together); `normalize` turns a uint8 batch into 3-channel float input on the device,
which moves a quarter of the bytes to the GPU and keeps the loader far above 1,000 images/s per core.
`normalize` takes a torch tensor (training, evaluate, the torch engine) or a NumPy array (ONNX
Runtime) with the same float32 arithmetic, so this module needs no torch import.

There is one deterministic path from a decoded image to model input, `preprocess`: the cache's
resize (`imageio.resize_square`, what `prepare` stored), then `resize`, which is the training warp at
identity (no flip, rotation, zoom or brightness change), so validation, evaluation and inference see
exactly what training sees with augmentation off: no train/serve skew.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

import cv2
import numpy as np

from cxrfusion.data.imageio import resize_square
from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError

if TYPE_CHECKING:
    import torch

Triple = tuple[float, float, float]
Batch = TypeVar("Batch", np.ndarray, "torch.Tensor")
Draws = TypeVar("Draws", np.ndarray, "torch.Tensor")
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)


def _warp_matrix(source: int, size: int, angle: float, scale: float, flip: bool) -> np.ndarray:
    """2x3 matrix mapping a source x source image onto size x size, about the centre."""
    s = scale * size / source
    cos, sin = s * math.cos(angle), s * math.sin(angle)
    sign = -1.0 if flip else 1.0
    centre_in, centre_out = (source - 1) / 2, (size - 1) / 2
    linear = np.array([[sign * cos, -sin], [sign * sin, cos]])
    offset = centre_out - linear @ np.array([centre_in, centre_in])
    return np.hstack([linear, offset[:, None]])


def augmentation_parameters(
    draws: Draws, augmentation: Augmentation
) -> tuple[Draws, Draws, Draws, Draws]:
    """Uniform draws -> the parameters of each image's warp: (angle, scale, flip, brightness).

    The one mapping of both augmentation paths (`augment` here, `device_augment` on the
    training device), so they draw from the same distribution: angle uniform in +-rotate_deg
    (radians), scale in 1 +- zoom, a flip with probability `flip`, brightness in 1 +- brightness,
    each image independently.

    Args:
        draws: (B, 4) uniform numbers in [-1, 1) per image (angle, zoom, flip, brightness), a
            NumPy array or a torch tensor (the result is of the same kind).
        augmentation: the ranges.
    """
    u_angle, u_zoom, u_flip, u_bright = (draws[:, i] for i in range(4))
    return (
        u_angle * math.radians(augmentation.rotate_deg),
        1 + u_zoom * augmentation.zoom,
        (u_flip + 1) / 2 < augmentation.flip,
        1 + u_bright * augmentation.brightness,
    )


def augment(
    images: np.ndarray, size: int, augmentation: Augmentation, draws: np.ndarray
) -> np.ndarray:
    """Randomly flip, rotate, zoom and brighten a uint8 batch (B, S, S) into (B, size, size).

    Args:
        draws: (B, 4) uniform numbers in [-1, 1] per image (angle, zoom, flip, brightness),
            seeded per image and epoch by the dataset (see `augmentation_parameters`).
    """
    out = np.empty((len(images), size, size), dtype=np.uint8)
    angles, scales, flips, brightness = augmentation_parameters(draws, augmentation)
    for i, (image, target) in enumerate(zip(images, out, strict=True)):
        _warp(
            image, target, float(angles[i]), float(scales[i]), bool(flips[i]), float(brightness[i])
        )
    return out


def _warp(
    image: np.ndarray, target: np.ndarray, angle: float, scale: float, flip: bool, brightness: float
) -> None:
    """The one geometric + intensity transform, written into `target` (size, size)."""
    size = target.shape[-1]
    matrix = _warp_matrix(image.shape[-1], size, angle, scale, flip)
    cv2.warpAffine(image, matrix, (size, size), dst=target, flags=cv2.INTER_LINEAR)
    cv2.convertScaleAbs(target, dst=target, alpha=brightness)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 batch (B, S, S) to (B, size, size) without augmentation.

    The training warp at identity (bilinear, about the centre), so that an image seen without
    augmentation is pixel for pixel what `augment` makes of it with every range at zero (at equal
    sizes that warp is the identity: a copy, ~25x cheaper).
    """
    if images.shape[-2:] == (size, size):
        return images.copy()
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for image, target in zip(images, out, strict=True):
        _warp(image, target, angle=0.0, scale=1.0, flip=False, brightness=1.0)
    return out


def preprocess(image: np.ndarray, cache_size: int, input_size: int) -> np.ndarray:
    """A decoded grayscale image (H, W) uint8 -> the uint8 (input_size, input_size) a model sees.

    The same two resizes as training: the cache's (`prepare` stores `resize_square(image,
    cache_size)`), then the loader's `resize` to the input side. Normalisation follows on the
    device (`normalize`).

    Args:
        image: 2-D uint8 array, as `imageio.read_image` returns.
        cache_size / input_size: the run's `cache_size` and `input_size` (its config.yaml).
    """
    return resize(resize_square(image, cache_size)[None], input_size)[0]


def normalize(images: Batch, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD) -> Batch:
    """uint8 batch (B, 1, H, W) -> float32 (B, 3, H, W) normalised with the model's `mean`/`std`.

    A torch tensor stays where it is (e.g. on the GPU after a uint8 transfer); a NumPy array gives
    a NumPy array, equal to the tensor's result bit for bit (tests/test_transforms.py).

    Args:
        mean / std: per-channel statistics on the 0..1 scale (`CxrModel.mean` / `.std`).
    """
    if (
        str(images.dtype).removeprefix("torch.") != "uint8"
        or images.ndim != 4
        or images.shape[1] != 1
    ):
        raise ValueError(f"expected uint8 (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    shape = (1, 3, 1, 1)
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32) / np.float32(255.0)
        return (x - np.float32(mean).reshape(shape)) / np.float32(std).reshape(shape)
    x = images.float() / 255.0
    return (x - x.new_tensor(mean).view(shape)) / x.new_tensor(std).view(shape)


def check_model_input(
    x: np.ndarray | torch.Tensor, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD
) -> None:
    """Refuse float input that was not normalised the way the model was trained.

    Silently wrong input ranges (0..255 floats, or un-normalised 0..1) are the most reported failure
    of chest X-ray toolkits: they give confident nonsense. Input normalised with `mean`/`std` lies
    in [(0 - max mean) / min std, (1 - min mean) / min std] (about [-2.2, 2.7] for ImageNet's).
    Both engines check what they are given; a blank image is in range (the Classifier warns).
    """
    low = (0 - max(mean)) / min(std)
    high = (1 - min(mean)) / min(std)
    lo, hi = float(x.min()), float(x.max())
    if lo < low - 1e-3 or hi > high + 1e-3:
        raise CxrError(
            f"model input range [{lo:.2f}, {hi:.2f}] is outside the normalised range "
            f"[{low:.2f}, {high:.2f}]: pass uint8 images through normalize()"
        )
