import numpy as np
import pytest
import torch
from PIL import Image

from cxrfusion.data.imageio import read_resized
from cxrfusion.data.options import Augmentation
from cxrfusion.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    check_model_input,
    normalize,
    preprocess,
    resize,
)
from cxrfusion.errors import CxrError
from cxrfusion.models import create_model
from cxrfusion.training.module import CxrClassifier

NONE = Augmentation(flip=0.0, rotate_deg=0.0, zoom=0.0, brightness=0.0)


def _draws(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 4))


def _left_bright(n: int = 4, side: int = 64) -> np.ndarray:
    images = np.zeros((n, side, side), dtype=np.uint8)
    images[:, :, : side // 2] = 200
    return images


def test_augmentation_with_all_ranges_zero_is_a_plain_resize():
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    same = augment(images, 64, NONE, _draws(3))
    np.testing.assert_array_equal(same, images)


def test_flip_mirrors_left_and_right():
    flipped = augment(
        _left_bright(), 64, Augmentation(flip=1.0, rotate_deg=0, zoom=0, brightness=0), _draws(4)
    )
    assert flipped[:, :, :30].mean() < 5 and flipped[:, :, 34:].mean() > 195


def test_augmentation_changes_images_within_its_ranges():
    images = _left_bright(64)
    augmentation = Augmentation(flip=0.0, rotate_deg=10, zoom=0.1, brightness=0.1)
    out = augment(images, 48, augmentation, _draws(64))
    assert out.shape == (64, 48, 48) and out.dtype == np.uint8
    assert len({o.tobytes() for o in out}) == 64  # every image drew its own parameters
    bright = out[:, 20:28, 2:10].astype(float).mean(axis=(1, 2))  # well inside the bright half
    assert bright.min() >= 200 * 0.9 - 2 and bright.max() <= 200 * 1.1 + 2


def test_augmentation_repeats_under_the_same_draws_only():
    images = _left_bright(8)
    first = augment(images, 32, Augmentation(), _draws(8, seed=3))
    np.testing.assert_array_equal(first, augment(images, 32, Augmentation(), _draws(8, seed=3)))
    assert not np.array_equal(first, augment(images, 32, Augmentation(), _draws(8, seed=4)))


def test_resize_goes_to_the_model_input_side():
    assert resize(_left_bright(2, 64), 32).shape == (2, 32, 32)


def test_normalize_gives_three_imagenet_channels():
    x = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2))
    assert x.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(
        x[0, :, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], 1e-5
    )
    np.testing.assert_allclose(x[0, :, 0, 1], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], 1e-5)
    check_model_input(x)


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_unnormalised_input_is_refused_loudly(scale):
    raw = torch.rand(1, 3, 8, 8) * scale
    if scale == 1.0:
        raw = raw * 4  # a 0..4 range no normalised image reaches
    with pytest.raises(CxrError, match="normalised range"):
        check_model_input(raw)


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.25,) * 3)])
def test_normalize_gives_numpy_the_bits_it_gives_torch(mean, std):
    """Inference on ONNX Runtime normalises in NumPy, training in torch: the same float32s."""
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16), dtype=np.uint8)
    images[0, 0, 0, :2] = 0, 255
    by_numpy = normalize(images, mean, std)
    by_torch = normalize(torch.from_numpy(images), mean, std)
    assert by_numpy.dtype == np.float32 and by_numpy.shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(by_numpy, by_torch.numpy())


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4, 4), np.uint8), np.zeros((2, 1, 4, 4))])
def test_normalize_refuses_anything_but_a_uint8_single_channel_batch(bad):
    with pytest.raises(ValueError, match="expected uint8"):
        normalize(bad)
    with pytest.raises(ValueError, match="expected uint8"):
        normalize(torch.from_numpy(bad))


def test_invalid_augmentation_settings_are_rejected():
    with pytest.raises(ValueError, match="flip"):
        Augmentation(flip=1.5)
    with pytest.raises(ValueError, match="below 1"):
        Augmentation(zoom=1.0)


def test_the_deterministic_resize_is_the_training_warp_with_augmentation_off():
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    for size in (48, 64, 80):
        np.testing.assert_array_equal(augment(images, size, NONE, _draws(5)), resize(images, size))


def test_preprocess_is_the_cache_resize_then_the_loader_resize(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (90, 70), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    cached = read_resized(path, 64)  # what `prepare` stores
    np.testing.assert_array_equal(preprocess(image, 64, 48), resize(cached[None], 48)[0])


def test_normalize_and_its_check_follow_the_models_statistics():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    x = normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(x[0, :, 0, :].numpy(), [[-1.0, 1.0]] * 3)
    check_model_input(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(CxrError, match="normalised range"):
        check_model_input(x * 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_timm_models_take_their_pretrained_normalisation_and_training_uses_it():
    vit = create_model("test_vit", weights="none")
    assert (vit.mean, vit.std) == (
        tuple(vit.features.pretrained_cfg["mean"]),
        tuple(vit.features.pretrained_cfg["std"]),
    )
    assert create_model("simple_cnn").mean == IMAGENET_MEAN

    module = CxrClassifier(model="test_vit")
    module.model.mean, module.model.std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    images = torch.randint(0, 256, (1, 1, 160, 160), dtype=torch.uint8)  # its fixed size
    module.eval()
    with torch.no_grad():
        expected = module.model(normalize(images, module.model.mean, module.model.std))
        np.testing.assert_allclose(module(images).numpy(), expected.numpy(), atol=1e-5)
