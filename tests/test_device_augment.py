"""The augmentation on the training device is the loader's: same image for the same parameters,
same parameters for the same (seed, epoch, image), same ranges, independent per image."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.data.device_augment import augment_batch, resize_batch, warp
from cxrfusion.data.imageio import read_resized
from cxrfusion.data.options import Augmentation
from cxrfusion.data.phantoms import render_phantom
from cxrfusion.data.transforms import augment, augmentation_parameters, resize

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-sample" / "images"
REPORT = Augmentation()  # flip 0.5, 10 degrees, zoom 0.1, brightness 0.1
WIDE = Augmentation(flip=0.5, rotate_deg=30, zoom=0.3, brightness=0.3)


def _radiographs(n: int = 6, side: int = 256) -> np.ndarray:
    """Real NIH radiographs as `prepare` caches them when ../shared is there, else phantoms."""
    paths = sorted(SAMPLE.glob("*.png"))[:n]
    if len(paths) == n:
        return np.stack([read_resized(path, side) for path in paths])
    return np.stack([render_phantom(["Cardiomegaly"], seed, side) for seed in range(n)])


def _extreme_draws(n: int) -> np.ndarray:
    """Every parameter at both ends of its range and in between, flips on and off."""
    draws = np.random.default_rng(0).uniform(-1, 1, (n, 4))
    draws[: n // 2, :] = np.where(np.arange(n // 2)[:, None] % 2, 0.999, -0.999)
    return draws


def _differences(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    return np.abs(a.astype(int) - b[:, 0].numpy().astype(int))


@pytest.mark.parametrize("size", [256, 224, 160])
@pytest.mark.parametrize("augmentation", [REPORT, WIDE], ids=["report", "wide"])
def test_the_device_warp_gives_the_loaders_image_for_the_same_parameters(size, augmentation):
    images = _radiographs()
    draws = _extreme_draws(len(images))
    on_cpu = augment(images, size, augmentation, draws)
    on_device = augment_batch(torch.from_numpy(images), size, augmentation, torch.from_numpy(draws))
    assert on_device.dtype == torch.uint8 and on_device.shape == (len(images), 1, size, size)
    difference = _differences(on_cpu, on_device)
    # OpenCV interpolates in fixed point (1/32 pixel, 15-bit weights), grid_sample in float32:
    # OpenCV 5 agrees to 2 grey levels (mean 4e-5), OpenCV 4 to 5 at steep edges (mean 0.045)
    assert difference.max() <= 6 and (difference > 2).mean() < 1e-3, difference.max()
    assert difference.mean() < 0.1
    # ... and a different parameter is a different image: the agreement above is not trivial
    other = draws.copy()
    other[:, 2] = -other[:, 2]
    flipped = augment_batch(torch.from_numpy(images), size, augmentation, torch.from_numpy(other))
    changed = _differences(on_cpu, flipped).mean(axis=(1, 2))
    assert (changed > 5).sum() >= len(images) // 2


def test_the_device_resize_is_the_loaders_resize():
    images = _radiographs(3)
    for size in (256, 224, 64):
        difference = _differences(
            resize(images, size), resize_batch(torch.from_numpy(images), size)
        )
        # rounding apart (OpenCV 4: one grey level in up to 12 % of pixels at 64 px)
        assert difference.max() <= 2 and difference.mean() < 0.15
    same = resize_batch(torch.from_numpy(images), 256)
    np.testing.assert_array_equal(same[:, 0].numpy(), images)  # equal sides: a copy


def test_rotation_turns_the_image_about_its_centre_the_way_opencv_does():
    """A bright dot right of the centre goes below it at +90 degrees (y down), in both paths."""
    image = np.zeros((1, 65, 65), np.uint8)
    image[0, 32, 52] = 255
    angle, one = torch.tensor([np.pi / 2]), torch.ones(1)
    turned = warp(torch.from_numpy(image), 65, angle, one, one < 0, one)[0, 0].numpy()
    row, col = np.unravel_index(turned.argmax(), turned.shape)
    expected = augment(image, 65, Augmentation(0, 90, 0, 0), np.array([[1.0, 0, 0, 0]]))[0]
    assert (row, col) == np.unravel_index(expected.argmax(), expected.shape)
    assert abs(row - 32) > 15 and abs(col - 32) <= 1


def test_parameters_are_one_mapping_for_numpy_and_torch():
    draws = np.random.default_rng(1).uniform(-1, 1, (64, 4))
    by_numpy = augmentation_parameters(draws, WIDE)
    by_torch = augmentation_parameters(torch.from_numpy(draws), WIDE)
    for expected, got in zip(by_numpy, by_torch, strict=True):
        np.testing.assert_allclose(expected, got.numpy())


def test_parameters_cover_the_ranges_uniformly_and_each_image_draws_its_own():
    """The table both paths read: per image, independent, uniform over each setting's range."""
    n = 4000
    dataset = CachedXrayDataset(
        np.zeros((n, 8, 8), np.uint8), np.arange(n), np.zeros((n, 14)), 8, REPORT, seed=3
    )
    _, draws = dataset.draws([(2, i) for i in range(n)])
    angle, scale, flip, brightness = augmentation_parameters(draws, REPORT)
    limit = np.radians(REPORT.rotate_deg)
    for values, low, high in (
        (angle, -limit, limit),
        (scale, 1 - REPORT.zoom, 1 + REPORT.zoom),
        (brightness, 1 - REPORT.brightness, 1 + REPORT.brightness),
    ):
        assert low <= values.min() and values.max() <= high
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    assert abs(flip.mean() - REPORT.flip) < 0.03
    # independent: no correlation between settings, nor between neighbours in a batch
    assert np.abs(np.corrcoef(draws.T) - np.eye(4)).max() < 0.06
    assert abs(np.corrcoef(angle[:-1], angle[1:])[0, 1]) < 0.06
    batch = dataset.draws([(2, i) for i in range(32)])[1]
    assert len({row.tobytes() for row in batch}) == 32
    # a function of (seed, epoch, image): the same key again, another epoch differs
    np.testing.assert_array_equal(dataset.draws([(2, 5)])[1], draws[5:6])
    assert not np.array_equal(dataset.draws([(3, 5)])[1], draws[5:6])
