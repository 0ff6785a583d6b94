"""Monte-Carlo dropout: T stochastic predictions per image (`uncertainty` reads them).

Every cxrfusion model keeps all its dropout in `head`, so the default `mode="head"` runs the
deterministic `features` once and samples only the head, T times in one batched call: the same
distribution as T full stochastic passes (each row of the repeated features draws its own
dropout masks) at about the cost of one deterministic pass. `mode="full"` runs T whole forward
passes for models that keep dropout elsewhere. BatchNorm stays in eval mode in both.
`mc_dropout_logits_per_image` runs the features of a batch at once but draws each image's masks
from a generator of its own, so that its samples do not depend on the rest of the batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("head", "full")


def _dropout_modules(module: nn.Module) -> list[nn.Module]:
    """Dropout layers (Dropout, Dropout1d/2d/3d, AlphaDropout, ...) that drop anything."""
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@functools.cache
def _warn_no_dropout(model_type: str) -> None:
    logger.warning("%s: model has no dropout: MC std is zero", model_type)


@contextmanager
def _sampling(model: nn.Module, dropouts: list[nn.Module]) -> Iterator[None]:
    """Only `dropouts` in train mode, everything else (BatchNorm) in eval; then restore.

    Flips just the flags that differ (often only the head's dropouts), without `train()`, whose
    recursion over a DenseNet's ~570 modules costs milliseconds per call.
    """
    sampling = {id(m) for m in dropouts}
    changed: list[nn.Module] = []
    try:
        for m in model.modules():
            if m.training != (id(m) in sampling):
                m.training = not m.training
                changed.append(m)
        yield
    finally:
        for m in changed:
            m.training = not m.training


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block only, leaving the global stream as it was."""
    if seed is None:
        yield
        return
    # manual_seed seeds every CUDA device, so every one is forked and restored.
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def mc_dropout_samples(
    model: nn.Module,
    x: torch.Tensor,
    samples: int = 25,
    mode: str = "head",
    seed: int | None = None,
) -> torch.Tensor:
    """T stochastic sigmoid probabilities per image with dropout active and BatchNorm frozen.

    The sigmoid of `mc_dropout_logits` (same arguments); returns (T, B, classes) on x's device.
    """
    return torch.sigmoid(mc_dropout_logits(model, x, samples, mode, seed))


@torch.inference_mode()
def mc_dropout_logits(
    model: nn.Module,
    x: torch.Tensor,
    samples: int = 25,
    mode: str = "head",
    seed: int | None = None,
) -> torch.Tensor:
    """T stochastic logits per image with dropout active and BatchNorm frozen.

    The model's train/eval state is restored afterwards; BatchNorm running statistics and
    parameters are never touched.

    Args:
        model: a cxrfusion model (`features(x) -> (B, F)`, `head(f) -> logits`, `forward`).
        x: normalised input (B, 3, H, W) on the model's device.
        samples: T, the number of stochastic passes (25 in the report).
        mode: "head" runs `features` once and samples `head` T times (all cxrfusion models keep
            their dropout there); "full" runs T whole forward passes (dropout anywhere).
        seed: seeds the dropout masks for this call only (the global RNG is left as it was);
            None draws from the global RNG.

    Returns:
        Logits (T, B, classes), float, on x's device.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dropouts = _dropout_modules(model)
    if not dropouts:
        _warn_no_dropout(type(model).__name__)
    if mode == "head" and _dropout_modules(model.features):
        raise ValueError("model.features holds dropout, which mode='head' ignores: use 'full'")
    # Without dropout one pass is every sample, and the std is exactly zero (not GEMM noise).
    draws = samples if dropouts else 1
    with _seeded(seed, x.device), _sampling(model, dropouts):
        if mode == "head":
            logits = model.head(model.features(x).repeat(draws, 1))  # row t*B + b is image b
            logits = logits.view(draws, len(x), -1)
        else:
            logits = torch.stack([model(x) for _ in range(draws)])
    return logits.expand(samples, -1, -1).contiguous()


@torch.inference_mode()
def mc_dropout_logits_per_image(
    model: nn.Module, x: torch.Tensor, samples: int, seeds: Sequence[int]
) -> torch.Tensor:
    """`mc_dropout_logits(model, x[b:b+1], samples, "head", seeds[b])` for every image b at once.

    The features of the whole batch are computed in one call; then each image's head runs on its
    own T rows under its own seed, so its dropout masks and the arithmetic after the features are
    exactly those of the image predicted alone, whatever else is in the batch. (The backbone's
    float32 rounding can still vary with the batch size: oneDNN and cuDNN choose their kernels by
    shape.) This is what lets a service batch concurrent requests without one request's numbers
    depending on its neighbours.

    Args:
        model: a cxrfusion model, all its dropout in `head` (as `mode="head"` requires).
        x: normalised input (B, 3, H, W) on the model's device.
        samples: T, the number of stochastic passes per image.
        seeds: one seed per image, for its dropout masks (the global RNG is left as it was).

    Returns:
        Logits (T, B, classes), float, on x's device.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if len(seeds) != len(x):
        raise ValueError(f"expected one seed per image ({len(x)}), got {len(seeds)}")
    dropouts = _dropout_modules(model)
    if not dropouts:
        _warn_no_dropout(type(model).__name__)
    if _dropout_modules(model.features):
        raise ValueError("model.features holds dropout, which per-image head sampling ignores")
    draws = samples if dropouts else 1
    with _sampling(model, dropouts):
        features = model.features(x)
        per_image = []
        for row, seed in zip(features, seeds, strict=True):
            with _seeded(seed, x.device):
                per_image.append(model.head(row[None].repeat(draws, 1)))
    logits = torch.stack(per_image, dim=1)  # (draws, B, classes)
    return logits.expand(samples, -1, -1).contiguous()
