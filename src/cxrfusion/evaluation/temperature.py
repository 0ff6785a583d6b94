"""Temperature scaling of the MC-dropout predictor, and the run's `temperature.json`.

One predictor, calibrated consistently: the model's prediction is the mean over T dropout samples
of sigmoid(logit), so a class's temperature is fitted on exactly that quantity,
mean_t sigmoid(logit_t / T), on the validation split's MC-dropout logits, and applied the same way
(each sample's logit divided by T, then averaged). Deterministic logits are the case T = 1 sample.
Fitting on deterministic logits and applying to the samples would calibrate another predictor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, logsumexp

from cxrfusion.atomic import write_atomic
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

TEMPERATURE_FILE = "temperature.json"
# Bounds of a fitted temperature: beyond them the fit is chasing separable data, not calibrating.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _samples(logits: np.ndarray) -> np.ndarray:
    """(N, C) deterministic or (S, N, C) sampled logits as (S, N, C) float."""
    z = np.asarray(logits, dtype=float)
    return z[None] if z.ndim == 2 else z


def mean_sample_nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """NLL of the predictor mean_t sigmoid(logit_t / T) for one class, computed in log space.

    Args:
        logits: (S, N) sampled logits of one class (S = 1 for a deterministic model).
        y_true: (N,) 0/1 outcomes.
        temperature: T > 0.
    """
    z = np.asarray(logits, dtype=float) / temperature
    log_s = np.log(z.shape[0])
    log_p = logsumexp(log_expit(z), axis=0) - log_s
    log_not_p = logsumexp(log_expit(-z), axis=0) - log_s
    return float(-np.mean(np.where(np.asarray(y_true) > 0, log_p, log_not_p)))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """One temperature per class minimising the NLL of mean_t sigmoid(logit_t / T).

    Fit it on validation data, never on the split you report. T > 1 softens an over-confident
    model, T < 1 sharpens an under-confident one. The search is over log T within
    `TEMPERATURE_BOUNDS` (bounded Brent).

    Args:
        logits: (S, N, C) MC-dropout logits, or (N, C) deterministic ones.
        y_true: (N, C) 0/1 ground truth.

    Returns:
        (C,) temperatures; 1.0 for a class with no positives or no negatives (nothing to fit).
    """
    z = _samples(logits)
    y = np.asarray(y_true, dtype=float)
    if z.ndim != 3 or z.shape[1:] != y.shape or z.size == 0:
        raise ValueError(f"logits {z.shape} must be (S, N, C) or (N, C) with y_true {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or not np.isfinite(z).all():
        raise ValueError("y_true must hold only 0 and 1 and logits must be finite")
    temperatures = np.ones(z.shape[2])
    for c in range(z.shape[2]):
        if y[:, c].all() or not y[:, c].any():
            continue
        result = minimize_scalar(
            lambda log_t, c=c: mean_sample_nll(z[:, :, c], y[:, c], np.exp(log_t)),
            bounds=np.log(TEMPERATURE_BOUNDS),
            method="bounded",
        )
        temperatures[c] = float(np.exp(result.x))
    return temperatures


def apply_temperature(logits: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Probabilities sigmoid(logits / T), sample by sample (average them for the prediction).

    Args:
        logits: (S, N, C) or (N, C) raw model outputs.
        temperature: (C,) per-class temperatures from `fit_temperature`, or one scalar.
    """
    return expit(np.asarray(logits, dtype=float) / np.asarray(temperature, dtype=float))


def write_temperature(run_dir: Path, temperature: np.ndarray, fitted_on: dict) -> Path:
    """Save the fitted temperatures as `<run>/temperature.json`, atomically.

    Args:
        run_dir: the run directory (inference reads the file from there).
        temperature: (14,) temperatures in LABELS order.
        fitted_on: how they were fitted (split, MC samples and mode, images), kept for the record.
    """
    record = {
        "temperature": dict(zip(LABELS, map(float, temperature), strict=True)),
        "applies_to": "mean over MC-dropout samples of sigmoid(logit / T), per class",
        "fitted_on": fitted_on,
    }
    return write_atomic(Path(run_dir) / TEMPERATURE_FILE, json.dumps(record, indent=2) + "\n")


def read_temperature(run_dir: Path) -> np.ndarray | None:
    """The run's (14,) temperatures in LABELS order, or None when it has no temperature.json.

    Raises:
        CxrError: the file is not a temperature record with a positive value per pathology.
    """
    path = Path(run_dir) / TEMPERATURE_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["temperature"]
        temperature = np.array([float(values[label]) for label in LABELS])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CxrError(
            f"{path}: not a temperature file ({type(error).__name__}: {error})"
        ) from None
    if not (np.isfinite(temperature) & (temperature > 0)).all():
        raise CxrError(f"{path}: temperatures must be positive numbers")
    return temperature
