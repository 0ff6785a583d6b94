"""The uncertainty read from MC-dropout samples (`mc_dropout` draws them) and the review flag.

NumPy only, so that ONNX Runtime inference (`cxrfusion.inference.onnx_engine`) runs without torch.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli(p); 0 at p = 0 or 1."""
    return -(xlogy(p, p) + xlogy(1 - p, 1 - p))


def summarise_samples(samples: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class and per-image uncertainty from MC-dropout probabilities.

    Args:
        samples: probabilities (T, B, C): an array, or a torch tensor on any device as
            `mc_dropout.mc_dropout_samples` returns it.

    Returns:
        float64 arrays: `mean`, `std` (population std over T, so 0 when T = 1),
        `predictive_entropy` (binary entropy of the mean, nats) and `mutual_information`
        (predictive entropy minus the mean per-sample entropy: BALD, the part due to the model's
        uncertainty) all (B, C); `uncertainty` (B,), the mean of the C stds (the report's score).
    """
    if hasattr(samples, "detach"):  # a torch tensor, without importing torch
        samples = samples.detach().cpu().numpy()
    p = np.asarray(samples, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] == 0:
        raise ValueError(f"samples must have shape (T >= 1, B, C), got {p.shape}")
    mean = p.mean(axis=0)
    std = p.std(axis=0)
    entropy = _binary_entropy(mean)
    expected_entropy = _binary_entropy(p).mean(axis=0)
    return {
        "mean": mean,
        "std": std,
        "predictive_entropy": entropy,
        # Non-negative by Jensen; clipping removes rounding noise of order 1e-17.
        "mutual_information": np.maximum(entropy - expected_entropy, 0.0),
        "uncertainty": std.mean(axis=1),
    }


def flag(uncertainty: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Boolean review flags: True where the per-image uncertainty exceeds `threshold`.

    Args:
        uncertainty: per-image scores (B,) from `summarise_samples`.
        threshold: the score above which a radiologist should review the image (0.1 as in the
            report; on the std scale, so in [0, 0.5]).
    """
    return np.asarray(uncertainty) > threshold
