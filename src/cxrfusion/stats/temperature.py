"""Temperature scaling of the MC-dropout predictor, and the run's `temperature.json`.

One predictor, calibrated consistently: the model's prediction is the mean over T dropout samples
of sigmoid(logit), so a class's temperature is fitted on exactly that quantity,
mean_t sigmoid(logit_t / T), on the validation split's MC-dropout logits, and applied the same way
(each sample's logit divided by T, then averaged). Deterministic logits are the case T = 1 sample.
Fitting on deterministic logits and applying to the samples would calibrate another predictor.

Per-class temperatures fitted freely on a validation split run away: a class with a few positives
is often separable there, and its NLL keeps falling as T -> 0 (logits x 20, probabilities like
1e-32 on new images). So one temperature is shared by all classes, and a class deviates from it
only as far as its own data pay for (a MAP fit with a normal prior on log T around the shared
value); a class with too few positives or negatives takes the shared value as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
# Prior on a class's log T around the shared one: sd 0.5 (a factor of 1.6 either way) costs as
# much as a few nats of NLL, which hundreds of positives pay easily and a handful cannot.
LOG_T_PRIOR_SD = 0.5
# A class with fewer positives (or negatives) than this takes the shared temperature: even shrunk,
# its own fit would cost more NLL on new images than it wins (measured in tests/test_calibration.py).
MIN_EVENTS = 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemperatureFit:
    """Fitted temperatures and what each rests on.

    Attributes:
        values: (C,) per-class temperatures, applied as sigmoid(logit / T).
        shared: the temperature fitted on all classes at once (the prior's centre).
        positives: (C,) validation positives per class.
        own: (C,) whether a class has its own (shrunk) value; False where it takes `shared`.
    """

    values: np.ndarray
    shared: float
    positives: np.ndarray
    own: np.ndarray

    def record(self) -> dict:
        """The fit as JSON-ready data, per class in LABELS order."""
        return {
            "shared": self.shared,
            "prior_sd_log_t": LOG_T_PRIOR_SD,
            "min_events": MIN_EVENTS,
            "classes": {
                label: {"temperature": float(t), "positives": int(n), "own_fit": bool(own)}
                for label, t, n, own in zip(
                    LABELS, self.values, self.positives, self.own, strict=True
                )
            },
        }


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


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> TemperatureFit:
    """Temperatures minimising the NLL of mean_t sigmoid(logit_t / T), shrunk toward a shared one.

    Fit them on validation data, never on the split you report. T > 1 softens an over-confident
    model, T < 1 sharpens an under-confident one. The shared T minimises the NLL summed over the
    classes with positives and negatives; a class with at least `MIN_EVENTS` of each then gets
    the MAP log T under a N(log shared, `LOG_T_PRIOR_SD`^2) prior, the others the shared T. All
    searches are over log T within `TEMPERATURE_BOUNDS` (bounded Brent); a value on a bound is
    logged as a warning.

    Args:
        logits: (S, N, C) MC-dropout logits, or (N, C) deterministic ones.
        y_true: (N, C) 0/1 ground truth, NaN where unknown.
    """
    z = _samples(logits)
    y = np.asarray(y_true, dtype=float)
    if z.ndim != 3 or z.shape[1:] != y.shape or z.size == 0:
        raise ValueError(f"logits {z.shape} must be (S, N, C) or (N, C) with y_true {y.shape}")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all() or not np.isfinite(z).all():
        raise ValueError("y_true must hold only 0 and 1 (or NaN) and logits must be finite")
    positives = (y == 1).sum(axis=0)
    events = np.minimum(positives, known.sum(axis=0) - positives)
    fittable = np.flatnonzero(events > 0)

    def nll_sum(log_t: float, classes: np.ndarray) -> float:
        """Summed NLL over the known labels of `classes` (a NaN label is left out)."""
        t = np.exp(log_t)
        return sum(
            known[:, c].sum() * mean_sample_nll(z[:, known[:, c], c], y[known[:, c], c], t)
            for c in classes
        )

    log_shared = _minimise(lambda u: nll_sum(u, fittable)) if fittable.size else 0.0

    def posterior(log_t: float, c: int) -> float:
        return nll_sum(log_t, [c]) + (log_t - log_shared) ** 2 / (2 * LOG_T_PRIOR_SD**2)

    own = events >= MIN_EVENTS
    values = np.full(y.shape[1], np.exp(log_shared))
    for c in np.flatnonzero(own):
        values[c] = np.exp(_minimise(lambda u, c=c: posterior(u, c)))
    fit = TemperatureFit(values, float(np.exp(log_shared)), positives, own)
    _warn_on_bounds(fit)
    return fit


def _minimise(objective: Callable[[float], float]) -> float:
    """The log T in the bounds minimising `objective` (bounded Brent)."""
    return float(minimize_scalar(objective, bounds=np.log(TEMPERATURE_BOUNDS), method="bounded").x)


def _warn_on_bounds(fit: TemperatureFit) -> None:
    low, high = TEMPERATURE_BOUNDS
    for label, t, n in zip(LABELS, fit.values, fit.positives, strict=False):
        if t < low * 1.01 or t > high / 1.01:
            log.warning(
                "the temperature of %s (%.3g, fitted on %d positives) sits on its bound %s: "
                "the validation data are (near) separable for it",
                label, t, n, TEMPERATURE_BOUNDS,
            )  # fmt: skip


def apply_temperature(logits: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Probabilities sigmoid(logits / T), sample by sample (average them for the prediction).

    Args:
        logits: (S, N, C) or (N, C) raw model outputs.
        temperature: (C,) per-class temperatures from `fit_temperature`, or one scalar.
    """
    return expit(np.asarray(logits, dtype=float) / np.asarray(temperature, dtype=float))


def write_temperature(
    run_dir: Path, temperature: np.ndarray, fitted_on: dict, fit: dict | None = None
) -> Path:
    """Save the fitted temperatures as `<run>/temperature.json`, atomically.

    Args:
        run_dir: the run directory (inference reads the file from there).
        temperature: (14,) temperatures in LABELS order.
        fitted_on: how they were fitted (split, MC samples and mode, images), kept for the record.
        fit: `TemperatureFit.record()`: the shared value and the positives behind each class.
    """
    record = {
        "temperature": dict(zip(LABELS, map(float, temperature), strict=True)),
        "applies_to": "mean over MC-dropout samples of sigmoid(logit / T), per class",
        "fitted_on": fitted_on,
    }
    if fit is not None:
        record["fit"] = fit
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
