"""Decision thresholds and a referral rule with a distribution-free guarantee (conformal risk control).

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control", ICLR 2024,
arXiv 2208.02814): for losses L_i(lambda) in [0, B] that shrink as lambda grows, the smallest lambda with
    n / (n + 1) * mean_i L_i(lambda) + B / (n + 1) <= alpha
on n calibration cases gives E[L_new(lambda)] <= alpha on a new case exchangeable with them, whatever
the model and the data distribution.

Two such rules are fitted on the validation split of a run (images treated as exchangeable; the split
is by patient, so new patients are what the guarantee speaks about):

- Per-pathology thresholds. For pathology k the calibration cases are the validation images positive
  for k and the loss is the miss 1[p_k < t_k]. The guarantee is on the false-negative rate:
  P(p_k < t_k | pathology k present) <= alpha for a new image; a pathology decides "positive" when
  p_k >= t_k. Too few positives (n_k < 1 / alpha - 1) give t_k = 0: every image is positive, the only
  rule with a guarantee there.
- Referral. With those thresholds, an image is *missed* when at least one of its true findings is
  decided negative. The model keeps an image when its uncertainty is below u and refers it to a
  radiologist otherwise. The loss is 1[kept and missed], so the guarantee reads: the share of new
  images that the model keeps while missing a finding (the *retained miss rate*; referred images count
  as read by a radiologist) is at most `referral_alpha`.

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
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.atomic import write_atomic
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.report import Section
from cxrfusion.labels import LABELS

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
METHODS = ("crc",)
LOSS_BOUND = 1.0  # B: both losses are 0/1


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration, as saved in `calibration.json`.

    Attributes:
        alpha: guaranteed bound on each pathology's expected false-negative rate.
        referral_alpha: guaranteed bound on the retained miss rate (see the module docstring).
        method: "crc" (conformal risk control).
        thresholds: pathology -> decision threshold on its probability (positive when p >= t).
        positives: pathology -> calibration positives its threshold was fitted on.
        referral_threshold: refer an image when its uncertainty >= this; None refers nothing.
        n_calibration: validation images used for the thresholds.
        n_referral: validation images (other patients) used for the referral threshold.
        mc_samples, mc_mode: the MC-dropout setting the calibration scores came from.
        bound: B, the largest value of a loss (1: misses are counted 0/1).
        score: what the thresholds apply to (the MC-dropout mean probability) and the
            uncertainty score the referral uses.
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


def crc_threshold(scores: np.ndarray, alpha: float, bound: float = LOSS_BOUND) -> float:
    """The CRC threshold t on the scores of the positive calibration cases: miss when score < t.

    The largest t with (#{scores < t} + B) / (n + 1) <= alpha is the (m + 1)-th smallest score,
    m = floor(alpha (n + 1) - B); with m < 0 no positive t qualifies and 0 is returned.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.sort(np.asarray(scores, dtype=float))
    allowed = math.floor(alpha * (len(scores) + 1) - bound + 1e-12)
    return 0.0 if allowed < 0 else float(scores[allowed])


def missed(y_true: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """(N,) bool: the image has a true finding that the decisions call negative."""
    return (np.asarray(y_true).astype(bool) & ~np.asarray(decisions, dtype=bool)).any(axis=1)


def referral_threshold(
    uncertainty: np.ndarray, miss: np.ndarray, alpha: float, bound: float = LOSS_BOUND
) -> float | None:
    """The CRC referral threshold u: keep an image when its uncertainty < u, refer it otherwise.

    The loss 1[kept and missed] grows with u; the largest u with (sum of losses + B) / (n + 1) <=
    alpha is the uncertainty of the (m + 1)-th least uncertain missed image, m = floor(alpha (n + 1)
    - B). None (refer nothing) when fewer images were missed; 0 (refer every image, uncertainties
    being stds >= 0) when m < 0.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"referral alpha must be in (0, 1), got {alpha}")
    uncertainty = np.asarray(uncertainty, dtype=float)
    missed_uncertainty = np.sort(uncertainty[np.asarray(miss, dtype=bool)])
    allowed = math.floor(alpha * (len(uncertainty) + 1) - bound + 1e-12)
    if allowed < 0:
        return 0.0
    if allowed >= len(missed_uncertainty):
        return None
    return float(missed_uncertainty[allowed])


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
    """
    if method not in METHODS:
        raise CxrError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    for name, value in (("--alpha", alpha), ("--referral-alpha", referral_alpha)):
        if not 0.0 < value < 1.0:
            raise CxrError(f"{name} {value}: must lie strictly between 0 and 1")
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probabilities, dtype=float)
    thresholds_part, referral_part = _halves(np.asarray(groups), seed)
    if not thresholds_part.any() or not referral_part.any():
        raise CxrError("calibration needs validation images of at least two patients")
    yt, pt = y[thresholds_part], p[thresholds_part]
    thresholds = {
        label: crc_threshold(pt[yt[:, k], k], alpha, LOSS_BOUND) for k, label in enumerate(LABELS)
    }
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
        np.asarray(uncertainty, dtype=float)[referral_part], miss, referral_alpha, LOSS_BOUND
    )
    return Calibration(
        alpha=alpha,
        referral_alpha=referral_alpha,
        method=method,
        thresholds=thresholds,
        positives={label: int(yt[:, k].sum()) for k, label in enumerate(LABELS)},
        referral_threshold=referral,
        n_calibration=int(thresholds_part.sum()),
        n_referral=int(referral_part.sum()),
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
    missing = set(LABELS) - set(calibration.thresholds)
    if missing:
        raise CxrError(f"{where}: no threshold for {sorted(missing)[0]}; run calibrate again")
    return calibration


def realised_rates(
    y_true: np.ndarray, probabilities: np.ndarray, uncertainty: np.ndarray, calibration: Calibration
) -> dict:
    """JSON-ready check of a calibration on evaluated images: realised FNR per pathology beside
    the bound, and the realised retained miss rate with the share referred."""
    y = np.asarray(y_true).astype(bool)
    positive, referred = apply_calibration(probabilities, uncertainty, calibration)
    classes = {}
    for k, label in enumerate(LABELS):
        n_pos = int(y[:, k].sum())
        misses = int((y[:, k] & ~positive[:, k]).sum())
        classes[label] = {
            "threshold": calibration.thresholds[label],
            "positives": n_pos,
            "false_negatives": misses,
            "fnr": misses / n_pos if n_pos else None,
            "bound": calibration.alpha,
        }
    kept_missed = missed(y, positive) & ~referred
    return {
        "alpha": calibration.alpha,
        "method": calibration.method,
        "n_calibration": calibration.n_calibration,
        "classes": classes,
        "referral": {
            "threshold": calibration.referral_threshold,
            "bound": calibration.referral_alpha,
            "referred": int(referred.sum()),
            "retained_miss_rate": float(kept_missed.mean()) if len(y) else None,
        },
    }


def conformal_section(realised: dict) -> Section:
    """The report's section: each pathology's threshold, realised FNR and bound; the referral."""
    table = pd.DataFrame.from_dict(realised["classes"], orient="index")
    table = table.rename(
        columns={
            "fnr": "realised FNR",
            "false_negatives": "false negatives",
            "bound": "bound (alpha)",
        }
    )
    table.index.name = "pathology"
    referral = realised["referral"]
    rule = (
        "refers nothing"
        if referral["threshold"] is None
        else f"refers images with uncertainty >= {referral['threshold']:.4g}"
    )
    rate = referral["retained_miss_rate"]
    return Section(
        "Guaranteed decisions (conformal risk control)",
        text=f"Thresholds fitted with conformal risk control ({realised['method']}) on "
        f"{realised['n_calibration']:,} validation images: for a new image from the same "
        f"distribution, each pathology's expected false-negative rate is at most "
        f"{realised['alpha']:g}. The bound is on the expected rate: the realised rate on these "
        "images, beside it, varies by chance, most where positives are few. A threshold of 0 "
        "(always positive) means too few validation positives for any other threshold.\n\n"
        f"Referral {rule}: the expected share of images kept by the model with a missed finding "
        f"is at most {referral['bound']:g}; here {referral['referred']:,} referred, realised "
        + ("n/a." if rate is None else f"{rate:.3f}."),
        table=table,
    )
