"""Referral curve: the AUC a model keeps on the cases it is sure about when it refers the rest.

If the uncertainty score is useful, referring the most uncertain images to a radiologist should
raise the AUC on the images the model still decides; a useless score leaves it flat.
"""

from __future__ import annotations

import numpy as np

from cxrfusion.stats.metrics import json_number, macro_auc, per_class_auc

DEFAULT_FRACTIONS = np.linspace(0.0, 0.5, 11)


def referral_curve(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    uncertainty: np.ndarray,
    fractions: np.ndarray = DEFAULT_FRACTIONS,
) -> dict:
    """Macro AUC on the retained images after referring the most uncertain fraction.

    The images are ordered by decreasing uncertainty with a stable sort, so equal uncertainties are
    referred in their input order and the curve is reproducible. `floor(fraction * N)` images are
    referred at each step. A class that loses all its positives (or negatives) in the retained set
    drops out of that step's macro AUC, as in `macro_auc`.

    Args:
        y_true: (N, C) 0/1 ground truth.
        y_prob: (N, C) predicted probabilities (or any monotone score).
        uncertainty: (N,) per-image uncertainty score; higher means referred earlier.
        fractions: fractions of the images to refer, each in [0, 1).

    Returns:
        JSON-ready dict of equally long lists: `fraction_referred` (floats), `macro_auc` (floats,
        None where no class is defined) and `n_retained` (ints).
    """
    uncertainty = np.asarray(uncertainty, dtype=float)
    fractions = np.asarray(fractions, dtype=float)
    n_images = len(uncertainty)
    if uncertainty.ndim != 1 or np.shape(y_true)[:1] != (n_images,):
        raise ValueError(f"uncertainty must be (N,) with N = len(y_true), got {uncertainty.shape}")
    if not np.isfinite(uncertainty).all():
        raise ValueError("uncertainty must be finite")
    if fractions.ndim != 1 or ((fractions < 0.0) | (fractions >= 1.0)).any():
        raise ValueError(f"fractions must be a 1-D array of values in [0, 1), got {fractions}")
    y, p = np.asarray(y_true), np.asarray(y_prob)
    # Most uncertain first; the small epsilon keeps e.g. 0.29 * 100 from flooring to 28.
    order = np.argsort(-uncertainty, kind="stable")
    n_referred = np.floor(fractions * n_images + 1e-9).astype(int)
    aucs = []
    for k in n_referred:
        retained = order[k:]
        value = macro_auc(per_class_auc(y[retained], p[retained]))
        aucs.append(json_number(value))
    return {
        "fraction_referred": [float(f) for f in fractions],
        "macro_auc": aucs,
        "n_retained": [int(n_images - k) for k in n_referred],
    }
