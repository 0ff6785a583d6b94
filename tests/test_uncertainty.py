"""Specifications of MC-dropout sampling (fast head-only path vs full passes) and its summaries."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.special import xlogy
from torch import nn

from cxrfusion.models import create_model, list_models
from cxrfusion.models.mc_dropout import (
    mc_dropout_logits,
    mc_dropout_logits_per_image,
    mc_dropout_samples,
)
from cxrfusion.stats.uncertainty import flag, summarise_samples

CLASSES = 14


class TinyNet(nn.Module):
    """conv + BatchNorm features, a head holding all the dropout (the cxrfusion model contract)."""

    def __init__(self, dropout: float = 0.5, feature_dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(feature_dropout),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(8, 32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(32, CLASSES),
        )
        batchnorm = self.features[1]
        # Running statistics far from the batch's: BatchNorm left in train mode would show.
        batchnorm.running_mean.fill_(0.3)
        batchnorm.running_var.fill_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DropoutFreeNet(TinyNet):
    def __init__(self) -> None:
        super().__init__(dropout=0.0)


def _input(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(seed: int = 0, **kwargs: float) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def _moments(samples: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Mean, std and their standard errors over T (the std's by the delta method)."""
    p = samples.double().numpy()
    t = len(p)
    mean, var = p.mean(axis=0), p.var(axis=0)
    fourth = ((p - mean) ** 4).mean(axis=0)
    se_mean = np.sqrt(var / t)
    se_var = np.sqrt(np.maximum(fourth - var**2, 0.0) / t)
    std = np.sqrt(var)
    return mean, std, se_mean, se_var / (2 * std)


def test_head_sampling_matches_the_distribution_of_full_stochastic_passes() -> None:
    model, x, t = _model(), _input(), 400
    fast = mc_dropout_samples(model, x, samples=t, mode="head", seed=1)
    full = mc_dropout_samples(model, x, samples=t, mode="full", seed=2)
    mean_a, std_a, se_mean_a, se_std_a = _moments(fast)
    mean_b, std_b, se_mean_b, se_std_b = _moments(full)
    assert (std_a > 0.005).all() and (std_b > 0.005).all()  # the comparison is not vacuous
    z = 5.0  # 28 comparisons: a false alarm at 5 standard errors has probability ~1e-5
    assert (np.abs(mean_a - mean_b) <= z * np.hypot(se_mean_a, se_mean_b)).all()
    assert (np.abs(std_a - std_b) <= z * np.hypot(se_std_a, se_std_b)).all()


def test_each_sample_draws_its_own_dropout_masks() -> None:
    samples = mc_dropout_samples(_model(), _input(), samples=10, seed=0)
    assert samples.shape == (10, 2, CLASSES)
    assert len(torch.unique(samples[:, 0, 0])) == 10


@pytest.mark.parametrize("mode", ["head", "full"])
def test_without_dropout_samples_equal_the_deterministic_eval_forward(mode: str) -> None:
    model, x = _model(dropout=0.0).train(), _input()
    samples = mc_dropout_samples(model, x, samples=1, mode=mode)
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x))
    torch.testing.assert_close(samples[0], expected)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_sampling_leaves_batchnorm_statistics_and_train_flags_as_they_were(mode: str) -> None:
    model = _model().train()
    model.head[0].eval()  # a mixed state must come back exactly, not as a blanket train()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mc_dropout_samples(model, _input(), samples=5, mode=mode)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_a_seed_reproduces_samples_without_moving_the_global_rng() -> None:
    model, x = _model(), _input()
    before = torch.get_rng_state()
    a = mc_dropout_samples(model, x, samples=4, seed=7)
    b = mc_dropout_samples(model, x, samples=4, seed=7)
    c = mc_dropout_samples(model, x, samples=4, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_model_without_dropout_has_zero_std_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x = DropoutFreeNet(), _input()
    with caplog.at_level(logging.WARNING):
        samples = mc_dropout_samples(model, x, samples=3)
        mc_dropout_samples(model, x, samples=3)
    assert summarise_samples(samples)["std"].max() == 0.0
    assert [r.getMessage() for r in caplog.records].count(
        "DropoutFreeNet: model has no dropout: MC std is zero"
    ) == 1


def test_head_mode_refuses_a_model_with_dropout_in_its_features() -> None:
    with pytest.raises(ValueError, match="mode='head'"):
        mc_dropout_samples(_model(feature_dropout=0.2), _input(), samples=2)
    assert mc_dropout_samples(_model(feature_dropout=0.2), _input(), 2, mode="full").shape[0] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"samples": 0}, "samples"), ({"mode": "x"}, "mode")]
)
def test_invalid_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mc_dropout_samples(_model(), _input(), **kwargs)


class OneByOne(nn.Module):
    """A backbone run image by image: features that cannot depend on the rest of the batch (a
    batched convolution may round differently with the batch size)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.inner = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1]) for i in range(len(x))])


def test_per_image_seeds_give_each_image_of_a_batch_exactly_its_samples_alone() -> None:
    model, x = _model(), _input(batch=4)
    model.features = OneByOne(model.features)
    seeds = [5, 5, 9, 0]
    before = torch.get_rng_state()
    together = mc_dropout_logits_per_image(model, x, 6, seeds)
    assert torch.equal(torch.get_rng_state(), before)
    for b, seed in enumerate(seeds):
        alone = mc_dropout_logits(model, x[b : b + 1], 6, "head", seed)
        assert torch.equal(together[:, b], alone[:, 0])
    # One generator for the whole batch (evaluate's way) gives the first image other masks.
    assert not torch.equal(together[:, 0], mc_dropout_logits(model, x, 6, "head", 5)[:, 0])
    with pytest.raises(ValueError, match="one seed per image"):
        mc_dropout_logits_per_image(model, x, 6, seeds[:3])


def test_summaries_match_a_hand_example() -> None:
    samples = np.array([[[0.2, 0.5]], [[0.8, 0.5]]])  # T=2, B=1, C=2
    s = summarise_samples(samples)
    h = -(xlogy(0.2, 0.2) + xlogy(0.8, 0.8))
    np.testing.assert_allclose(s["mean"], [[0.5, 0.5]])
    np.testing.assert_allclose(s["std"], [[0.3, 0.0]])
    np.testing.assert_allclose(s["predictive_entropy"], [[np.log(2), np.log(2)]])
    np.testing.assert_allclose(s["mutual_information"], [[np.log(2) - h, 0.0]], atol=1e-15)
    np.testing.assert_allclose(s["uncertainty"], [0.15])


def test_mutual_information_lies_between_zero_and_predictive_entropy() -> None:
    p = np.random.default_rng(0).random((25, 6, CLASSES))
    p[:, 0] = 1.0  # certain predictions: zero entropy, no NaN
    s = summarise_samples(torch.from_numpy(p))
    assert (s["mutual_information"] >= 0).all()
    assert (s["mutual_information"] <= s["predictive_entropy"] + 1e-12).all()
    assert (s["predictive_entropy"][0] == 0).all()


def test_flag_marks_images_strictly_above_the_threshold() -> None:
    np.testing.assert_array_equal(flag(np.array([0.05, 0.1, 0.15])), np.array([False, False, True]))
    np.testing.assert_array_equal(flag(np.array([0.05, 0.15]), threshold=0.01), [True, True])


def test_summaries_take_a_tensor_that_requires_grad() -> None:
    p = torch.rand(4, 3, CLASSES, requires_grad=True)
    summary = summarise_samples(p)
    np.testing.assert_allclose(summary["mean"], p.detach().numpy().mean(axis=0), rtol=1e-6)


def test_summaries_refuse_samples_without_a_sample_axis() -> None:
    with pytest.raises(ValueError, match="shape"):
        summarise_samples(np.zeros((2, CLASSES)))


@pytest.mark.parametrize("name", list_models())
def test_every_model_samples_its_head_and_without_dropout_equals_its_eval_forward(
    name: str,
) -> None:
    model, x = create_model(name).train(), _input(size=32)
    std = summarise_samples(mc_dropout_samples(model, x, samples=3, seed=0))["std"]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert (std.max() > 0) == bool(dropouts)  # simple_cnn has none: exactly zero
    assert model.training
    for dropout in dropouts:
        dropout.p = 0.0
    samples = mc_dropout_samples(model, x, samples=2)
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x))
    torch.testing.assert_close(samples, expected.expand(2, -1, -1))
