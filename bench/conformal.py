"""Realised error rates of conformal calibration per image vs per patient, on clustered data.

Each data set has patients with 4-10 images; a patient has a pathology on all of its images or on
none, and the logits of its images share a patient effect (intra-class correlation ICC), half of
it common to all pathologies. In the last scenario patients whose findings are harder to see have
more images, so that patient-averaged and image-weighted rates differ. Half the patients calibrate
(`fit_calibration`: thresholds on half of them, referral on the other half), the other half are
new patients. Prints, per scenario and calibration unit, the mean realised false-negative rate
(the mean over the 14 pathologies of each data set) averaged over patients and over images, with
its Monte-Carlo standard error over data sets, beside alpha; then the same for the retained miss
rate beside the referral alpha. About 40 s on two cores.

    .venv/bin/python bench/conformal.py
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from scipy.special import expit, ndtr

from cxrfusion.labels import NUM_LABELS
from cxrfusion.stats.conformal import (
    UNITS,
    Calibration,
    apply_calibration,
    fit_calibration,
    unit_mean,
)

PREVALENCE = 0.2  # of each pathology, per patient
# (calibration patients N, ICC of the logits, harder patients have more images); the thresholds see
# about N / 2 x PREVALENCE positive patients per pathology, the referral the other N / 2 patients.
SCENARIOS = (
    (100, 0.9, False),
    (200, 0.9, False),
    (200, 0.95, False),
    (600, 0.9, False),
    (200, 0.0, False),
    (600, 0.9, True),
)


def simulate(
    rng: np.random.Generator, n_patients: int, icc: float, harder_more: bool
) -> tuple[np.ndarray, ...]:
    """Labels, probabilities, uncertainty and patient of each image, clustered by patient."""
    common = rng.normal(size=n_patients)  # low: every finding of the patient is hard to see
    sizes = 4 + np.rint(6 * ndtr(-2 * common)) if harder_more else rng.integers(4, 11, n_patients)
    groups = np.repeat(np.arange(n_patients), sizes.astype(int))
    y = (rng.random((n_patients, NUM_LABELS)) < PREVALENCE)[groups]
    own = rng.normal(size=(n_patients, NUM_LABELS))
    shared = np.sqrt(0.5) * (common[:, None] + own)[groups]
    noise = np.sqrt(icc) * shared + np.sqrt(1 - icc) * rng.normal(size=y.shape)
    p = expit(2.5 * y - 1.5 + noise)
    uncertainty = 0.5 - np.abs(p - 0.5).mean(axis=1) + 0.05 * rng.random(len(groups))
    return y, p, uncertainty, groups


def realised(
    y: np.ndarray, p: np.ndarray, u: np.ndarray, groups: np.ndarray, calibration: Calibration
) -> np.ndarray:
    """[FNR patient-averaged, FNR image-weighted, retained miss likewise], FNRs averaged over
    the pathologies present."""
    positive, referred = apply_calibration(p, u, calibration)
    kept_missed = (y & ~positive).any(axis=1) & ~referred
    rates = []
    for unit in UNITS:
        fnr = [unit_mean(~positive[y[:, k], k], groups[y[:, k]], unit) for k in range(y.shape[1])]
        rates.append(np.mean([f for f in fnr if f is not None]))
    return np.array([*rates, *(unit_mean(kept_missed, groups, unit) for unit in UNITS)])


def scenario_rates(
    rng: np.random.Generator,
    n_patients: int,
    icc: float,
    harder_more: bool,
    replicates: int,
    alpha: float,
    referral: float,
) -> dict[str, np.ndarray]:
    """Calibration unit -> (replicates, 4) realised rates (see `realised`) on new patients."""
    out: dict[str, list] = {unit: [] for unit in UNITS}
    for _ in range(replicates):
        y, p, u, groups = simulate(rng, 2 * n_patients, icc, harder_more)
        cal = groups < n_patients  # patients are independent: the first half calibrates
        seed = int(rng.integers(2**31))
        for unit in UNITS:
            fitted = fit_calibration(
                y[cal], p[cal], u[cal], groups[cal], alpha, referral, seed=seed, unit=unit
            )
            out[unit].append(realised(y[~cal], p[~cal], u[~cal], groups[~cal], fitted))
    return {unit: np.array(rates) for unit, rates in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=300, help="data sets per scenario")
    parser.add_argument("--alpha", type=float, default=0.1, help="false-negative bound")
    parser.add_argument("--referral-alpha", type=float, default=0.05, help="retained miss bound")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # rare classes' "always positive" warnings, once per fit
    rng = np.random.default_rng(args.seed)
    results = {
        scenario: scenario_rates(rng, *scenario, args.replicates, args.alpha, args.referral_alpha)
        for scenario in SCENARIOS
    }
    print(
        f"{args.replicates} data sets per scenario of 2 N patients (N calibrate, N are new), "
        f"4-10 images each, prevalence {PREVALENCE:g} per patient and pathology"
    )
    for title, columns, bound in (
        ("false-negative rate", slice(0, 2), args.alpha),
        ("retained miss rate", slice(2, 4), args.referral_alpha),
    ):
        print(f"\n{title}: mean realised over data sets (Monte-Carlo standard error)")
        print(
            "| N | positive patients | ICC | images | unit | patient-averaged | image-weighted "
            "| bound |"
        )
        print("|---:|---:|---:|---|---|---:|---:|---:|")
        for (n, icc, harder_more), by_unit in results.items():
            images = "4-10, more if harder" if harder_more else "4-10"
            for unit, rates in by_unit.items():
                mean = rates[:, columns].mean(axis=0)
                error = rates[:, columns].std(axis=0, ddof=1) / np.sqrt(len(rates))
                cells = " | ".join(f"{m:.4f} ({e:.4f})" for m, e in zip(mean, error, strict=True))
                positives = f"~{n / 2 * PREVALENCE:.0f}"
                print(f"| {n} | {positives} | {icc:g} | {images} | {unit} | {cells} | {bound:g} |")


if __name__ == "__main__":
    main()
