"""Glue between a run and the three trust checks: expert labels, localisation, conformal calibration.

`evaluate` calls `load_sources` before its long work (a wrong path fails at once) and
`trust_results` after its predictions; `calibrate_run` is `cxrfusion calibrate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.data.prepare import find_beside_table
from cxrfusion.errors import CxrError
from cxrfusion.evaluation import expert_labels, localisation
from cxrfusion.evaluation.report import Section
from cxrfusion.stats import conformal

log = logging.getLogger(__name__)

LABEL_SOURCES = ("google2019",)


@dataclass(frozen=True)
class Sources:
    """The extra reference data of one evaluation (None: not asked for)."""

    expert: pd.DataFrame | None = None
    expert_path: Path | None = None
    boxes: pd.DataFrame | None = None
    boxes_path: Path | None = None


def load_sources(
    prepared: Path,
    labels: str | None = None,
    labels_file: str | None = None,
    boxes: str | None = None,
) -> Sources:
    """Read the expert labels and the boxes asked for.

    Args:
        prepared: the run's prepared folder (it records the NIH table beside which the files lie).
        labels: "google2019" or None.
        labels_file: explicit expert label file; default: beside the NIH table.
        boxes: None (no localisation), "" (the box file beside the NIH table) or a path.
    """
    if labels_file is not None and labels is None:
        raise CxrError("--labels-file needs --labels google2019")
    expert = expert_path = box_table = box_path = None
    if labels is not None:
        if labels not in LABEL_SOURCES:
            raise CxrError(f"--labels {labels!r}: expected one of {', '.join(LABEL_SOURCES)}")
        expert_path = (
            Path(labels_file)
            if labels_file
            else find_beside_table(prepared, (expert_labels.EXPERT_FILE,), "--labels-file")
        )
        expert = expert_labels.read_expert_labels(expert_path)
    if boxes is not None:
        box_path = (
            Path(boxes)
            if boxes
            else find_beside_table(prepared, (localisation.BOX_FILE,), "--boxes PATH")
        )
        box_table = localisation.read_boxes(box_path)
    return Sources(expert, expert_path, box_table, box_path)


def trust_results(
    sources: Sources,
    out: Path,
    run_dir: Path,
    model,
    dataset,
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    uncertainty: np.ndarray,
    input_size: int,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[dict, list[Section]]:
    """metrics.json entries and report sections of the checks asked for.

    Args:
        sources: `load_sources` output.
        out: the evaluation folder (for the box figure).
        run_dir: the run (its calibration.json, if any, is checked).
        model, dataset: the evaluated model and split (Grad-CAM for the boxes).
        rows: the split's rows in dataset order (`Image Index`, `Patient ID`, the 14 labels).
        probabilities, uncertainty: (N, 14) MC-dropout means and (N,) uncertainty, without
            temperature scaling (the scores calibration.json was fitted on).
        input_size: side of the model input.
        n_resamples, seed: patient bootstrap of the expert-label CIs.

    Returns:
        ({"expert_labels" | "localisation" | "conformal": ...}, sections).
    """
    metrics: dict = {}
    sections: list[Section] = []
    if sources.expert is not None:
        metrics["expert_labels"] = expert_labels.expert_label_metrics(
            rows, probabilities, sources.expert, sources.expert_path, n_resamples, seed
        )
        sections.append(expert_labels.expert_section(metrics["expert_labels"]))
    if sources.boxes is not None:
        names = rows["Image Index"].tolist()
        heatmap = localisation.gradcam_heatmap_fn(model, dataset)
        found = localisation.localisation_metrics(
            sources.boxes, names, heatmap, input_size, sources.boxes_path
        )
        figure = localisation.box_figure(
            sources.boxes, names, dataset, heatmap, input_size, out / "localisation.png"
        )
        metrics["localisation"] = found
        sections.append(localisation.localisation_section(found, figure))
    calibration = conformal.load_calibration(run_dir)
    if calibration is not None:
        y = rows[list(conformal.LABELS)].to_numpy()
        groups = rows["Patient ID"].to_numpy()
        metrics["conformal"] = conformal.realised_rates(
            y, probabilities, uncertainty, groups, calibration
        )
        sections.append(conformal_section(metrics["conformal"]))
    return metrics, sections


def calibrate_run(
    run: Path,
    alpha: float = 0.1,
    referral_alpha: float = 0.05,
    method: str = "crc",
    mc_samples: int = 25,
    mc_mode: str = "head",
    batch_size: int = 64,
    seed: int = 0,
    unit: str | None = None,
) -> tuple[conformal.Calibration, Path]:
    """`cxrfusion calibrate`: fit calibration.json on the run's validation split.

    The scores are the MC-dropout means and uncertainties that `evaluate`, the API and the service
    compute with the same `mc_samples` and `mc_mode`. `unit` ("patient", "image", None: patient
    when a validation patient has several images) is what the guarantee treats as exchangeable.
    """
    for name, value in (("--alpha", alpha), ("--referral-alpha", referral_alpha)):
        if not 0 < value < 1:  # checked before the long pass over the validation split
            raise CxrError(f"{name} must be in (0, 1), got {value}")
    if unit is not None and unit not in conformal.UNITS:
        raise CxrError(f"--unit {unit!r}: expected one of {', '.join(conformal.UNITS)}")
    import torch
    from scipy.special import expit

    from cxrfusion.data.dataset import split_datasets
    from cxrfusion.data.split import read_split
    from cxrfusion.evaluation.predictions import predict_sample_logits
    from cxrfusion.inference.runs import load_run, resolve_checkpoint
    from cxrfusion.stats.uncertainty import summarise_samples

    checkpoint = resolve_checkpoint(run)
    run_dir = checkpoint.parent
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_run(checkpoint, device)
    split_file = run_dir / "split.csv"
    val = split_datasets(
        Path(config.prepared), config.cache_size, config.input_size, split_file=split_file
    )["val"]
    if len(val) == 0:
        raise CxrError(f"{split_file}: the validation split is empty; nothing to calibrate on")
    split = read_split(split_file)
    rows = split[split["split"] == "val"]
    logits = predict_sample_logits(model, val, mc_samples, mc_mode, batch_size, seed)
    summary = summarise_samples(expit(logits))
    fitted = conformal.fit_calibration(
        rows[list(conformal.LABELS)].to_numpy(),
        summary["mean"],
        summary["uncertainty"],
        rows["Patient ID"].to_numpy(),
        alpha=alpha,
        referral_alpha=referral_alpha,
        method=method,
        seed=seed,
        unit=unit,
    )
    fitted = replace(fitted, mc_samples=mc_samples, mc_mode=mc_mode)
    path = conformal.save_calibration(fitted, run_dir)
    log.info("calibration of %s written to %s", run_dir, path)
    return fitted, path


def conformal_section(realised: dict) -> Section:
    """The report's section: each pathology's threshold, realised FNR and bound; the referral."""
    table = pd.DataFrame.from_dict(realised["classes"], orient="index")
    unit = realised["unit"]
    averaged = conformal.UNITS[unit]
    table = table.rename(
        columns={
            "fnr": f"realised FNR ({averaged})",
            "positive_patients": "positive patients",
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
        f"{realised['n_calibration']:,} validation images "
        + conformal.GUARANTEES[unit].format(alpha=realised["alpha"])
        + ". The bound is on the expected rate: the realised rate on these images, beside it and "
        "averaged alike, varies by chance, most where positive patients are few. A threshold of "
        "0 (always positive) means too few validation positives for any other threshold.\n\n"
        f"Referral {rule}: the expected {averaged} share of images kept by the model with a "
        f"missed finding is at most {referral['bound']:g}; here {referral['referred']:,} "
        "referred, realised " + ("n/a." if rate is None else f"{rate:.3f}."),
        table=table,
    )
