"""The sections of an evaluation report, assembled from its metrics.json and figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.evaluation.report import Section, auc_table, calibration_table, write_report
from cxrfusion.labels import LABELS


def _headline(metrics: Mapping) -> str:
    macro, uncertainty = metrics["auc"]["macro"], metrics["uncertainty"]
    ci = (
        f" (95 % CI {macro['ci_low']:.3f} - {macro['ci_high']:.3f}, from {macro['n_valid']:,} of "
        f"{metrics['auc']['n_resamples']:,} patient resamples)"
        if macro["ci_low"] is not None
        else ""
    )
    auc = "n/a" if macro["auc"] is None else f"{macro['auc']:.3f}"
    return (
        f"Macro ROC-AUC {auc}{ci} on {metrics['counts']['images']:,} "
        f"{metrics['split']} images of {metrics['counts']['patients']:,} patients; "
        f"{uncertainty['flagged']:,} flagged for review (uncertainty above "
        f"{uncertainty['threshold']})."
    )


def auprc_table(auprc: Mapping) -> pd.DataFrame:
    """AUPRC and its chance level (the prevalence) per class, from metrics.json's `auprc`."""
    table = pd.DataFrame.from_dict(
        {
            label: {
                "AUPRC": np.nan if entry["auprc"] is None else entry["auprc"],
                "prevalence (chance AUPRC)": entry["prevalence"],
            }
            for label, entry in auprc["classes"].items()
        },
        orient="index",
    )
    table.index.name = "pathology"
    return table


def operating_point_table(points: Mapping) -> pd.DataFrame:
    """Threshold, sensitivity and specificity per class at both validation-chosen points."""
    target = f"{100 * points['target_sensitivity']:g} % sens."
    rows = {}
    for label, entry in points["classes"].items():
        rows[label] = {}
        for key, name in (("youden", "Youden"), ("sensitivity_target", target)):
            point = entry[key]
            for field in ("threshold", "sensitivity", "specificity"):
                value = point[field]
                rows[label][f"{name} {field}"] = np.nan if value is None else value
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "pathology"
    return table


def subgroup_table(subgroups: Mapping) -> pd.DataFrame:
    """One row per subgroup: images, patients, macro AUC, then the AUC of each class."""
    rows = {}
    for kind, groups in subgroups.items():
        for name, entry in groups.items():
            row = {"images": entry["images"], "patients": entry["patients"]}
            row["macro AUC"] = np.nan if entry["macro_auc"] is None else entry["macro_auc"]
            row |= {k: np.nan if v is None else v for k, v in entry["auc"].items()}
            rows[f"{kind} {name}"] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "subgroup"
    return table


def _data_table(split: pd.DataFrame) -> pd.DataFrame:
    """Images, patients and positives per split (the data the run was trained and tested on)."""
    groups = split.groupby("split", sort=False)
    table = pd.DataFrame({"images": groups.size(), "patients": groups["Patient ID"].nunique()})
    return pd.concat([table, groups[list(LABELS)].sum()], axis=1).T


def _calibration_section(metrics: Mapping, figure: Path) -> Section:
    before = metrics.get("calibration_before_temperature")
    if before is None:
        return Section(
            "Calibration", table=calibration_table(metrics["calibration"]), figure=figure
        )
    scaling = metrics.get("temperature_scaling")
    origin = (
        f"fitted on the {scaling['fitted_on']['split']} split's MC-dropout logits and saved as "
        "temperature.json in the run"
        if scaling
        else "read from the run's temperature.json (fitted by an earlier evaluation)"
    )
    return Section(
        "Calibration",
        text=f"Per-class temperatures {origin}; the predictor is the mean of sigmoid(logit / T) "
        "over the dropout samples.",
        table=calibration_table(before, metrics["calibration"]),
        figure=figure,
        caption="Reliability of all image-class pairs before and after temperature scaling.",
    )


def _temperature_section(fit: Mapping) -> Section:
    """The fitted temperatures, with the positives behind each and whether it is its own."""
    table = pd.DataFrame(fit["classes"]).T.rename(
        columns={"temperature": "T", "positives": "validation positives", "own_fit": "own fit"}
    )
    table["own fit"] = table["own fit"].map({True: "yes", False: "shared"})
    return Section(
        "Temperatures",
        text=f"One temperature shared by all classes (T = {fit['shared']:.3f}); a class with at "
        f"least {fit['min_events']} validation positives and negatives deviates from it as far "
        f"as its data pay for (MAP, prior sd of log T {fit['prior_sd_log_t']}), the others take "
        "it as it is.",
        table=table,
    )


def _subgroup_section(metrics: Mapping) -> Section:
    if not metrics["subgroups"]:
        return Section("Subgroups", text=metrics["subgroups_note"])
    return Section(
        "Subgroups",
        text="ROC-AUC by sex, age band and view position (n/a: a class without positives or "
        "negatives in the group).",
        table=subgroup_table(metrics["subgroups"]),
    )


def write_evaluation_report(
    out: Path,
    run_dir: Path,
    config_yaml: str,
    split: pd.DataFrame,
    metrics: Mapping,
    figures: Mapping[str, Path],
    extra: Sequence[Section] = (),
) -> tuple[Path, Path]:
    """Write report.html and report.md of one evaluation into `out`.

    Args:
        out: the evaluation folder (holds the figures).
        run_dir: the evaluated run, named in the summary.
        config_yaml: the run's config, shown at the end.
        split: the run's whole split.csv (the data table).
        metrics: the evaluation's metrics.json content.
        figures: name -> PNG path from `evaluation_figures` and `example_figures`.
        extra: further sections (expert labels, localisation, conformal), placed before "Data".
    """
    uncertainty = metrics["uncertainty"]
    notes = "".join(f"\n\n- {note}" for note in metrics["notes"])
    sections = [
        Section("Summary", text=f"Run: {run_dir}\n\n{_headline(metrics)}{notes}"),
        Section(
            "Per-class ROC-AUC",
            table=auc_table(metrics["auc"]),
            figure=figures["roc"],
            caption="ROC curve per pathology; CIs resample patients.",
        ),
        Section(
            "Per-class AUPRC",
            text="Average precision; its chance level is the class prevalence, not 0.5.",
            table=auprc_table(metrics["auprc"]),
        ),
        Section(
            "Operating points",
            text="Thresholds chosen on the validation split (Youden's J, and the highest "
            "threshold reaching the target sensitivity there), applied unchanged to the "
            f"{metrics['split']} split: its sensitivity and specificity.",
            table=operating_point_table(metrics["operating_points"]),
        ),
        _subgroup_section(metrics),
        _calibration_section(metrics, figures["reliability"]),
        *(
            [_temperature_section(metrics["temperature_scaling"]["fit"])]
            if "temperature_scaling" in metrics
            else []
        ),
        Section(
            "Uncertainty",
            text=f"Monte-Carlo dropout, T = {uncertainty['mc_samples']} ({uncertainty['mc_mode']} "
            f"mode). Mean uncertainty {uncertainty['mean_uncertainty']:.4f}, mean mutual "
            f"information {uncertainty['mean_mutual_information']:.4f}.",
            figure=figures["mc_histogram"],
            caption="The T sampled probabilities of the most uncertain image's top class.",
        ),
        Section(
            "Referral",
            figure=figures["referral"],
            caption="Macro AUC on the retained images as the most uncertain are referred.",
        ),
        Section(
            "Predictions",
            figure=figures["grid"],
            caption="Most uncertain and most confident images: truth and top predictions.",
        ),
        *[
            Section(f"Grad-CAM: {name.split(' ', 1)[1]}", figure=path)
            for name, path in figures.items()
            if name.startswith("gradcam ")
        ],
        *extra,
        Section(
            "Data",
            text="Images, patients and positives per split (split by patient).",
            table=_data_table(split),
        ),
        Section("Run config", code=config_yaml),
    ]
    return write_report(out, f"cxrfusion evaluation: {Path(run_dir).name}", sections)
