"""Plain vs patient-clustered DeLong vs a paired patient bootstrap, on clustered simulated data.

Phantom-like data: 1-6 images per patient (follow-ups repeat the patient's finding with
probability 0.85) and two models whose errors have a per-patient part. Prints (1) the standard
error of the AUC difference by each method on one data set, and (2) how often each test rejects
a true null hypothesis at 5 % over many data sets: the level a valid test keeps.

    .venv/bin/python bench/patient_tests.py --patients 400 --replicates 400
"""

from __future__ import annotations

import argparse

import numpy as np

from cxrfusion.stats.delong import clustered_delong_test, delong_covariance, delong_test
from cxrfusion.stats.metrics import paired_bootstrap_auc_difference


def simulate(
    n_patients: int, rng: np.random.Generator, patient_error: float
) -> tuple[np.ndarray, ...]:
    """Truth, two equally good models' scores and the patient of each image."""
    sizes = rng.integers(1, 7, n_patients)
    groups = np.repeat(np.arange(n_patients), sizes)
    sick = rng.random(n_patients) < 0.3
    y = np.where(rng.random(len(groups)) < 0.85, sick[groups], ~sick[groups]).astype(int)
    latent = rng.normal(0, 1.0, n_patients)[groups] + 1.2 * y
    scores = [
        latent + 0.4 * rng.normal(size=len(y)) + patient_error * rng.normal(size=n_patients)[groups]
        for _ in range(2)
    ]
    return y, scores[0], scores[1], groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="patients per data set")
    parser.add_argument("--replicates", type=int, default=400, help="null data sets")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--patient-error", type=float, default=0.6, help="per-patient model error")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    y, a, b, groups = simulate(args.patients, rng, args.patient_error)
    _, cov = delong_covariance(y, a, b)
    plain_se = float(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    clustered = clustered_delong_test(y, a, b, groups)
    boot = paired_bootstrap_auc_difference(y, a, b, groups, args.bootstrap, seed=args.seed)
    print(f"one data set: {len(y)} images of {args.patients} patients")
    print("| method | SE of AUC difference | p |")
    print("|---|---:|---:|")
    print(f"| plain DeLong (images independent) | {plain_se:.4f} | {delong_test(y, a, b)[2]:.3f} |")
    print(f"| clustered DeLong (Obuchowski) | {clustered['se']:.4f} | {clustered['p_value']:.3f} |")
    print(
        f"| paired patient bootstrap ({boot['n_valid']} of {args.bootstrap} valid) | "
        f"{boot['se']:.4f} | {boot['p_value']:.3f} |"
    )

    plain, cluster = [], []
    for _ in range(args.replicates):
        y, a, b, groups = simulate(args.patients // 5, rng, args.patient_error)
        plain.append(delong_test(y, a, b)[2] < 0.05)
        cluster.append(clustered_delong_test(y, a, b, groups)["p_value"] < 0.05)
    print(
        f"\nrejections of a true null at 5 % over {args.replicates} data sets of "
        f"{args.patients // 5} patients: plain DeLong {np.mean(plain):.3f}, clustered DeLong "
        f"{np.mean(cluster):.3f}"
    )


if __name__ == "__main__":
    main()
