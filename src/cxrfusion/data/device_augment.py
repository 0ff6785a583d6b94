"""The training augmentation on torch tensors, for batches that live on the training device.

`transforms.augment` warps each image with OpenCV in the loader; this module does the same warp for
a whole uint8 batch at once with `affine_grid` / `grid_sample` where the batch already is (a GPU
holding the image cache: see `training.device_data`). Both map the same uniform draws through
`transforms.augmentation_parameters`, so they apply the same parameters to the same image: what
differs is interpolation arithmetic only (OpenCV's fixed point against float32; a grey level or
two, measured in tests/test_device_augment.py), so both paths train on the same distribution.

Like the OpenCV path, the warp is bilinear about the image centre with black outside the image,
rounds to uint8, then scales the brightness and rounds again (`cv2.convertScaleAbs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cxrfusion.data.options import Augmentation
from cxrfusion.data.transforms import augmentation_parameters


def warp_theta(angle: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """`affine_grid`'s (B, 2, 3) matrices of the OpenCV warp of `transforms._warp_matrix`.

    OpenCV maps a source pixel p to A p + b with A = s R F (s = scale * size / source, R the
    rotation, F the flip) about the centres; `affine_grid` wants the inverse, output -> input, in
    coordinates normalised to [-1, 1] (align_corners=False). There the centres are 0 and the pixel
    pitch of either side cancels s's size ratio, leaving (1 / scale) F R^T with no translation:
    the same matrix for every source and output side.

    Args:
        angle: (B,) radians; scale: (B,) zoom factor (above 1 zooms in); flip: (B,) bool.
    """
    sign = 1.0 - 2.0 * flip.to(angle.dtype)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    return torch.stack(
        [torch.stack([sign * cos, sign * sin, zero], -1), torch.stack([-sin, cos, zero], -1)], -2
    )


def warp(
    images: torch.Tensor,
    size: int,
    angle: torch.Tensor,
    scale: torch.Tensor,
    flip: torch.Tensor,
    brightness: torch.Tensor,
) -> torch.Tensor:
    """Warp a uint8 batch (B, S, S) into uint8 (B, 1, size, size), one set of parameters per image.

    Args:
        images: uint8 (B, S, S) or (B, 1, S, S), on any device.
        size: side of the output.
        angle / scale / flip / brightness: (B,) each, as `transforms.augmentation_parameters`
            gives them, on the images' device.
    """
    x = images.reshape(len(images), 1, *images.shape[-2:]).float()
    theta = warp_theta(angle.float(), scale.float(), flip)
    grid = F.affine_grid(theta, [len(x), 1, size, size], align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.round_().clamp_(0, 255)  # the warp's own uint8 result, as OpenCV's
    return (warped * brightness.float().view(-1, 1, 1, 1)).round_().clamp_(0, 255).to(torch.uint8)


def augment_batch(
    images: torch.Tensor, size: int, augmentation: Augmentation, draws: torch.Tensor
) -> torch.Tensor:
    """`transforms.augment` on tensors: flip, rotate, zoom and brighten (B, S, S) into (B, 1, size, size).

    Args:
        images: uint8 (B, S, S) or (B, 1, S, S).
        draws: (B, 4) uniform numbers in [-1, 1) per image, the dataset's (seed, epoch, index)
            table (`CachedXrayDataset.draws`), on the images' device.
    """
    return warp(images, size, *augmentation_parameters(draws, augmentation))


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """`transforms.resize` on tensors: the warp at identity; at equal sides a copy."""
    if images.shape[-2:] == (size, size):
        return images.reshape(len(images), 1, size, size).clone()
    ones = torch.ones(len(images), device=images.device)
    return warp(images, size, ones * 0, ones, ones < 0, ones)
