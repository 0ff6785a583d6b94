"""Decision thresholds and a referral rule with a distribution-free guarantee (conformal risk control).

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control", ICLR 2024,
arXiv 2208.02814): for losses L_i(lambda) in [0, B] that shrink as lambda grows, the smallest lambda with
    n / (n + 1) * mean_i L_i(lambda) + B / (n + 1) <= alpha
on n calibration cases gives E[L_new(lambda)] <= alpha on a new case exchangeable with them, whatever
the model and the data distribution.

Two such rules are fitted on the validation split of a run. The calibration *unit* is what CRC
treats as exchangeable, and so what the guarantee speaks about:

- "image": each image is a case. Exact for exchangeable images; but a patient's follow-up images
  are correlated, and with few positive patients the realised rate then exceeds alpha
  (bench/conformal.py).
- "patient": each patient is a case and its loss is the share of its images that the rule gets
  wrong. The split is by patient, so new patients are exchangeable with the calibration ones and
  the guarantee holds for the *patient-averaged* rate. The default when a validation patient has
  several images.

A patient's loss is its images' 0/1 losses weighted by 1 / (its images), so both units are one
weighted CRC over images (weights 1 for the image unit), n being the sum of the weights.

- Per-pathology thresholds. For pathology k the calibration cases are the validation images (or
  patients) positive for k and the loss is the miss 1[p_k < t_k] (or the share of the patient's
  positive images missed). The guarantee is on the false-negative rate: for a new image positive
  for k, P(p_k < t_k) <= alpha; for a new patient with k, the expected share of their positive
  images with p_k < t_k is at most alpha. A pathology decides "positive" when p_k >= t_k. Too few
  positives (n_k < 1 / alpha - 1) give t_k = 0: every image is positive, the only rule with a
  guarantee there.
- Referral. With those thresholds, an image is *missed* when at least one of its true findings is
  decided negative. The model keeps an image when its uncertainty is below u and refers it to a
  radiologist otherwise. The loss is 1[kept and missed] (or its share among the patient's images),
  so the guarantee reads: the share of new images (of a new patient's images) that the model keeps
  while missing a finding (the *retained miss rate*; referred images count as read by a
  radiologist) is at most `referral_alpha`.

The validation images are split into two patient-disjoint halves: the thresholds are fitted on one,
the referral rule on the other, because a miss depends on the thresholds and CRC needs its losses
fixed before its calibration cases are looked at.

MAPIE's multi-label risk control (`PrecisionRecallController`) fits one lambda shared by all labels,
per image, around a scikit-learn estimator; it offers neither per-pathology thresholds nor a rule on a
separate uncertainty score, so the few lines of CRC are written here (both losses are 0/1 steps,
so the CRC threshold is an order statistic).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxrfusion.atomic import write_atomic
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABELS

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
METHODS = ("crc",)
# Calibration unit -> how the guaranteed (and reported) rates average over images.
UNITS = {"patient": "patient-averaged", "image": "image-weighted"}
LOSS_BOUND = 1.0  # B: both losses are 0/1
# Each unit's guarantee, as the report states it.
GUARANTEES = {
    "patient": "with patients as the exchangeable unit: for a new patient with a pathology, the "
    "expected share of their positive images missed (the patient-averaged false-negative rate) "
    "is at most {alpha:g}",
    "image": "with images as the exchangeable unit: for a new image showing a pathology, the "
    "chance that it is missed (the image-weighted false-negative rate) is at most {alpha:g}; "
    "exact for exchangeable images only, as a patient's images are correlated (`calibrate "
    "--unit patient` guarantees the patient-averaged rate)",
}


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration, as saved in `calibration.json`.

    Attributes:
        alpha: guaranteed bound on each pathology's expected false-negative rate.
        referral_alpha: guaranteed bound on the retained miss rate (see the module docstring).
        method: "crc" (conformal risk control).
        thresholds: pathology -> decision threshold on its probability (positive when p >= t).
        positives: pathology -> positive calibration units (images or patients, see `unit`) its
            threshold was fitted on.
        referral_threshold: refer an image when its uncertainty >= this; None refers nothing.
        n_calibration: validation images used for the thresholds.
        n_referral: validation images (other patients) used for the referral threshold.
        mc_samples, mc_mode: the MC-dropout setting the calibration scores came from.
        bound: B, the largest value of a loss (1: misses are counted 0/1).
        score: what the thresholds apply to (the MC-dropout mean probability) and the
            uncertainty score the referral uses.
        unit: "patient" or "image", the exchangeable cases (see the module docstring); files
            written before units existed were fitted on images.
    """

    alpha: float
    referral_alpha: float
    method: str
    thresholds: dict[str, float]
    positives: dict[str, int]
    referral_threshold: float | None
    n_calibration: int
    n_referral: int
    mc_samples: int = 25
    mc_mode: str = "head"
    bound: float = LOSS_BOUND
    score: str = "MC-dropout mean probability; uncertainty = mean of the 14 stds"
    unit: str = "image"


def _crc_cut(
    scores: np.ndarray, weights: np.ndarray, n: float, alpha: float, bound: float
) -> float | None:
    """The largest t with (weight of the scores below t + B) / (n + 1) <= alpha.

    That is the lowest score at which the weights of the scores at or below it exceed the budget
    alpha (n + 1) - B; 0 when the budget is negative (no positive t qualifies), None when all the
    weights fit in it.
    """
    budget = alpha * (n + 1) - bound
    if budget < -1e-12:
        return 0.0
    order = np.argsort(scores, kind="stable")
    over = np.flatnonzero(np.cumsum(weights[order]) > budget + 1e-9)
    return None if len(over) == 0 else float(scores[order][over[0]])


def unit_weights(groups: np.ndarray, unit: str) -> np.ndarray:
    """(N,) each image's share of its unit's loss: 1, or 1 / (the patient's images in `groups`)."""
    if unit == "image":
        return np.ones(len(groups))
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def crc_threshold(
    scores: np.ndarray,
    alpha: float,
    bound: float = LOSS_BOUND,
    weights: np.ndarray | None = None,
) -> float:
    """The CRC threshold t on the scores of the positive calibration cases: miss when score < t.

    Unweighted, the largest t with (#{scores < t} + B) / (n + 1) <= alpha is the (m + 1)-th
    smallest score, m = floor(alpha (n + 1) - B); with m < 0 no positive t qualifies and 0 is
    returned. `weights` (`unit_weights` of the positives) make a patient's loss the share of its
    positive images missed, n the number of patients.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.asarray(scores, dtype=float)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    return _crc_cut(scores, w, w.sum(), alpha, bound) or 0.0  # None is impossible: n > budget


def missed(y_true: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """(N,) bool: the image has a true finding that the decisions call negative."""
    return ((np.asarray(y_true) == 1) & ~np.asarray(decisions, dtype=bool)).any(axis=1)


def referral_threshold(
    uncertainty: np.ndarray,
    miss: np.ndarray,
    alpha: float,
    bound: float = LOSS_BOUND,
    weights: np.ndarray | None = None,
) -> float | None:
    """The CRC referral threshold u: keep an image when its uncertainty < u, refer it otherwise.

    The loss 1[kept and missed] grows with u; unweighted, the largest u with (sum of losses + B) /
    (n + 1) <= alpha is the uncertainty of the (m + 1)-th least uncertain missed image, m =
    floor(alpha (n + 1) - B). None (refer nothing) when fewer images were missed; 0 (refer every
    image, uncertainties being stds >= 0) when m < 0. `weights` (`unit_weights` of all the
    images) make a patient's loss the share of its images kept and missed, n the patients.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"referral alpha must be in (0, 1), got {alpha}")
    uncertainty = np.asarray(uncertainty, dtype=float)
    w = np.ones(len(uncertainty)) if weights is None else np.asarray(weights, dtype=float)
    miss = np.asarray(miss, dtype=bool)
    return _crc_cut(uncertainty[miss], w[miss], w.sum(), alpha, bound)


def default_unit(groups: np.ndarray) -> str:
    """The patient unit when a patient has several images (their losses are correlated, not
    exchangeable), else the image unit."""
    return "patient" if len(np.unique(groups)) < len(groups) else "image"


def _halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of two patient-disjoint halves of the images (seeded)."""
    patients = np.unique(groups)
    chosen = np.random.default_rng(seed).permutation(patients)[: (len(patients) + 1) // 2]
    first = np.isin(groups, chosen)
    return first, ~first


def fit_calibration(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    uncertainty: np.ndarray,
    groups: np.ndarray,
    alpha: float = 0.1,
    referral_alpha: float = 0.05,
    method: str = "crc",
    seed: int = 0,
    unit: str | None = None,
) -> Calibration:
    """Fit per-pathology thresholds and the referral threshold on validation predictions.

    Args:
        y_true: (N, 14) 0/1 labels of the validation images.
        probabilities: (N, 14) the scores the thresholds will apply to (MC-dropout means).
        uncertainty: (N,) per-image uncertainty; higher is referred first.
        groups: (N,) patient ids: the two calibration halves never share a patient.
        alpha: bound on each pathology's false-negative rate, in (0, 1).
        referral_alpha: bound on the retained miss rate, in (0, 1).
        method: "crc".
        seed: seed of the patient halves.
        unit: "patient", "image" or None (`default_unit` of `groups`): what the guarantee
            treats as exchangeable (see the module docstring).
    """
    if method not in METHODS:
        raise CxrError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if unit is not None and unit not in UNITS:
        raise CxrError(f"--unit {unit!r}: expected one of {', '.join(UNITS)}")
    for name, value in (("--alpha", alpha), ("--referral-alpha", referral_alpha)):
        if not 0.0 < value < 1.0:
            raise CxrError(f"{name} {value}: must lie strictly between 0 and 1")
    y = np.asarray(y_true) == 1  # an unknown (NaN) label is never a missed finding
    p = np.asarray(probabilities, dtype=float)
    groups = np.asarray(groups)
    unit = unit or default_unit(groups)
    thresholds_part, referral_part = _halves(groups, seed)
    if not thresholds_part.any() or not referral_part.any():
        raise CxrError("calibration needs validation images of at least two patients")
    yt, pt, gt = y[thresholds_part], p[thresholds_part], groups[thresholds_part]
    thresholds, positives = {}, {}
    for k, label in enumerate(LABELS):
        weights = unit_weights(gt[yt[:, k]], unit)
        thresholds[label] = crc_threshold(pt[yt[:, k], k], alpha, LOSS_BOUND, weights)
        positives[label] = round(weights.sum())  # the weights of a unit sum to 1
    trivial = [label for label, t in thresholds.items() if t == 0.0]
    if trivial:
        log.warning(
            "too few validation positives for FNR <= %g: %s always positive",
            alpha,
            ", ".join(trivial),
        )
    cut = np.array([thresholds[label] for label in LABELS])
    miss = missed(y[referral_part], p[referral_part] >= cut)
    referral = referral_threshold(
        np.asarray(uncertainty, dtype=float)[referral_part],
        miss,
        referral_alpha,
        LOSS_BOUND,
        unit_weights(groups[referral_part], unit),
    )
    return Calibration(
        alpha=alpha,
        referral_alpha=referral_alpha,
        method=method,
        thresholds=thresholds,
        positives=positives,
        referral_threshold=referral,
        n_calibration=int(thresholds_part.sum()),
        n_referral=int(referral_part.sum()),
        unit=unit,
    )


def apply_calibration(
    probabilities: np.ndarray, uncertainty: np.ndarray, calibration: Calibration
) -> tuple[np.ndarray, np.ndarray]:
    """Decisions and referrals for new images.

    Args:
        probabilities: (N, 14) MC-dropout mean probabilities in `LABELS` order.
        uncertainty: (N,) per-image uncertainty (mean of the 14 stds).

    Returns:
        (positive (N, 14) bool: p >= the pathology's threshold, referred (N,) bool).
    """
    p = np.asarray(probabilities, dtype=float)
    cut = np.array([calibration.thresholds[label] for label in LABELS])
    positive = p >= cut
    u = np.asarray(uncertainty, dtype=float)
    if calibration.referral_threshold is None:
        return positive, np.zeros(len(u), dtype=bool)
    return positive, u >= calibration.referral_threshold


def save_calibration(calibration: Calibration, run_dir: Path) -> Path:
    """Write `<run>/calibration.json` atomically."""
    text = json.dumps(asdict(calibration), indent=2, allow_nan=False)
    return write_atomic(Path(run_dir) / CALIBRATION_FILE, text + "\n")


def load_calibration(run_dir: Path) -> Calibration | None:
    """The run's calibration, or None when `cxrfusion calibrate` has not been run."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CxrError(f"{path}: not a calibration file ({error}); run calibrate again") from None
    return calibration_from_dict(data, path)


def calibration_from_dict(data: dict, where: Path | str) -> Calibration:
    """A calibration from its saved fields (calibration.json, or an export's model.json), checked.

    Raises:
        CxrError: fields are missing or a pathology has no threshold; the message names `where`.
    """
    try:
        calibration = Calibration(**data)
    except TypeError as error:
        raise CxrError(f"{where}: not a calibration file ({error}); run calibrate again") from None
    if calibration.unit not in UNITS:
        raise CxrError(f"{where}: unit {calibration.unit!r} is not one of {', '.join(UNITS)}")
    missing = set(LABELS) - set(calibration.thresholds)
    if missing:
        raise CxrError(f"{where}: no threshold for {sorted(missing)[0]}; run calibrate again")
    return calibration


def unit_mean(values: np.ndarray, groups: np.ndarray, unit: str) -> float | None:
    """Mean of per-image values: over images, or over patients of each patient's mean; None
    without images."""
    if len(values) == 0:
        return None
    if unit == "image":
        return float(np.mean(values))
    _, inverse = np.unique(groups, return_inverse=True)
    return float(np.mean(np.bincount(inverse, weights=values) / np.bincount(inverse)))


def realised_rates(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    uncertainty: np.ndarray,
    groups: np.ndarray,
    calibration: Calibration,
) -> dict:
    """JSON-ready check of a calibration on evaluated images: realised FNR per pathology beside
    the bound, and the realised retained miss rate with the share referred, both averaged as the
    guarantee is (over patients or images, `calibration.unit`).

    Args:
        groups: (N,) patient ids of the evaluated images.
    """
    y = np.asarray(y_true) == 1  # an unknown (NaN) label is never a missed finding
    groups = np.asarray(groups)
    unit = calibration.unit
    positive, referred = apply_calibration(probabilities, uncertainty, calibration)
    classes = {}
    for k, label in enumerate(LABELS):
        present = y[:, k]
        miss = ~positive[present, k]
        classes[label] = {
            "threshold": calibration.thresholds[label],
            "positives": int(present.sum()),
            "positive_patients": len(np.unique(groups[present])),
            "false_negatives": int(miss.sum()),
            "fnr": unit_mean(miss, groups[present], unit),
            "bound": calibration.alpha,
        }
    kept_missed = missed(y, positive) & ~referred
    return {
        "alpha": calibration.alpha,
        "method": calibration.method,
        "unit": unit,
        "n_calibration": calibration.n_calibration,
        "classes": classes,
        "referral": {
            "threshold": calibration.referral_threshold,
            "bound": calibration.referral_alpha,
            "referred": int(referred.sum()),
            "retained_miss_rate": unit_mean(kept_missed, groups, unit),
        },
    }
