"""`cxrfusion evaluate`: MC-dropout predictions > calibration > metrics > figures > report.

The pipeline only: temperature scaling is in temperature.py, operating points and subgroups in
their modules, the figures in figures.py and the report's sections in sections.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrfusion.atomic import write_atomic
from cxrfusion.checks import check_bool, check_choice, check_number
from cxrfusion.data.cache import open_cache
from cxrfusion.data.dataset import CachedXrayDataset, split_datasets
from cxrfusion.data.split import read_split
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.figures import evaluation_figures, example_figures
from cxrfusion.evaluation.predictions import predict_sample_logits, predictions_table
from cxrfusion.evaluation.sections import write_evaluation_report
from cxrfusion.evaluation.trust import load_sources, trust_results
from cxrfusion.inference.runs import load_run, resolve_checkpoint
from cxrfusion.labels import LABELS
from cxrfusion.stats.calibration import calibration_summary
from cxrfusion.stats.conformal import Calibration, load_calibration
from cxrfusion.stats.metrics import auc_summary, json_number, per_class_average_precision
from cxrfusion.stats.operating_points import operating_points
from cxrfusion.stats.referral import referral_curve
from cxrfusion.stats.subgroups import subgroup_aucs
from cxrfusion.stats.temperature import (
    TemperatureFit,
    apply_temperature,
    fit_temperature,
    read_temperature,
    write_temperature,
)
from cxrfusion.stats.uncertainty import summarise_samples
from cxrfusion.tables import to_csv

log = logging.getLogger(__name__)

# The split that temperatures and operating-point thresholds are chosen on.
TUNING_SPLIT = "val"


@dataclass(frozen=True)
class EvaluateOptions:
    """How to evaluate a run.

    Args:
        split: which split of the run's split.csv to evaluate (test, val or train).
        mc_samples: T Monte-Carlo dropout passes (25 in the report).
        mc_mode: "head" (backbone once, head T times: same distribution, ~T times cheaper) or
            "full" (T whole passes, for models with dropout outside the head).
        threshold: per-image uncertainty (mean of the 14 stds) above which an image is flagged.
        temperature_scale: fit one temperature per class on the validation split's MC-dropout
            logits, apply it to every sample, and save it as <run>/temperature.json.
        bootstrap: patient-level bootstrap resamples for the 95 % CIs.
        seed: seed of the dropout masks and of the bootstrap.
        batch_size: images per forward pass.
        examples: images shown in the prediction grid and explained with Grad-CAM.
        labels: "google2019" scores the images with Google's 2019 expert labels too.
        labels_file: the expert label file (default: beside the NIH table).
        boxes: localisation against NIH's boxes: None (off), "" (the file beside the NIH table)
            or the box file.
        prepared: external validation: another prepared folder (`cxrfusion prepare`, cached at
            the run's cache size) whose `split` ("all" for every image) is evaluated with the
            run's preprocessing, temperatures and validation thresholds; only the findings that
            data reports (positives and negatives among its known labels) are scored.
    """

    split: str = "test"
    mc_samples: int = 25
    mc_mode: str = "head"
    threshold: float = 0.1
    temperature_scale: bool = False
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 64
    examples: int = 4
    labels: str | None = None
    labels_file: str | None = None
    boxes: str | None = None
    prepared: str | None = None

    def __post_init__(self) -> None:
        splits = ("test", "val", "train") + (("all",) if self.prepared else ())
        check_choice("split", self.split, splits)
        check_number("mc_samples", self.mc_samples, integer=True, low=1)
        check_choice("mc_mode", self.mc_mode, ("head", "full"))
        check_number("threshold", self.threshold, low=0)
        check_bool("temperature_scale", self.temperature_scale)
        check_number("bootstrap", self.bootstrap, integer=True, low=1)
        check_number("seed", self.seed, integer=True, low=0, high=2**32 - 1)
        check_number("batch_size", self.batch_size, integer=True, low=1)
        check_number("examples", self.examples, integer=True, low=1)


@dataclass(frozen=True)
class SplitData:
    """One split's images (as the model reads them) and its split.csv rows, in the same order."""

    dataset: CachedXrayDataset
    rows: pd.DataFrame

    @property
    def y(self) -> np.ndarray:
        return self.rows[list(LABELS)].to_numpy()


def load_split_data(run_dir: Path, config, names: set[str]) -> dict[str, SplitData]:
    """The run's data for the splits in `names`: the one place evaluate reads images.

    Raises:
        CxrError: a requested split is empty in the run's split.csv.
    """
    split_file = run_dir / "split.csv"
    split = read_split(split_file)
    datasets = split_datasets(
        Path(config.prepared), config.cache_size, config.input_size, split_file=split_file
    )
    data = {}
    for name in names:
        if len(datasets[name]) == 0:
            raise CxrError(f"{split_file}: the {name!r} split is empty")
        data[name] = SplitData(datasets[name], split[split["split"] == name])
    return data


def load_external(prepared: Path, config, name: str) -> SplitData:
    """The `name` split ("all": every image) of another prepared folder, as the run reads images.

    Raises:
        CxrError: the split is empty, or the folder has no cache of the run's size.
    """
    split_file = Path(prepared) / "split.csv"
    split = read_split(split_file)
    rows = split if name == "all" else split[split["split"] == name]
    if rows.empty:
        raise CxrError(f"{split_file}: the {name!r} split is empty")
    cache = open_cache(Path(prepared), config.cache_size)
    dataset = CachedXrayDataset(
        cache.path,
        cache.rows_for(rows["Image Index"].tolist(), prepared),
        rows[list(LABELS)].to_numpy(),
        config.input_size,
    )
    return SplitData(dataset, rows)


def overlap(run_split: pd.DataFrame, rows: pd.DataFrame) -> dict[str, int]:
    """Images and patients of `rows` that the run's own split.csv also holds (any split)."""
    return {
        "shared_images": int(rows["Image Index"].isin(run_split["Image Index"]).sum()),
        "shared_patients": int(
            rows["Patient ID"].astype(str).isin(run_split["Patient ID"].astype(str)).sum()
        ),
    }


def _check_out(out: Path, run_dir: Path) -> Path:
    """An evaluation folder that replacing cannot destroy anything else: not the run itself or a
    folder above it, and, when it exists, an earlier evaluation (it holds metrics.json) or empty."""
    out = out.resolve()
    if run_dir.resolve().is_relative_to(out):
        raise CxrError(f"{out}: --out would replace the run itself; choose a folder inside it")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise CxrError(f"{out}: --out holds files that are not an evaluation; choose another")
    return out


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh sibling folder to write into; renamed to `out` (replacing it) when complete.

    A failure removes the staging folder, so no half-written evaluation is ever left, and an
    older evaluation at `out` stays as it was until the new one is complete.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    retired = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            os.replace(out, retired)
        try:
            os.replace(staging, out)
        except OSError:
            if retired.exists():
                os.replace(retired, out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def evaluate(
    run: Path, out: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> Path:
    """Evaluate a run directory (or a checkpoint in one); returns the folder with report.html.

    Writes predictions.csv, metrics.json, the figures and report.html / report.md into `out`
    (default: <run>/eval_<split>), all at once: the folder appears complete or not at all. With
    `temperature_scale`, also <run>/temperature.json (see `temperature.py` for what is fitted).
    """
    checkpoint = resolve_checkpoint(run)
    run_dir = checkpoint.parent
    external = Path(options.prepared) if options.prepared else None
    default = (
        f"external_{external.resolve().name}_{options.split}"
        if external
        else f"eval_{options.split}"
    )
    out = _check_out(Path(out), run_dir) if out else run_dir / default
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_run(checkpoint, device)
    model = model.to(memory_format=torch.channels_last)
    split = read_split(run_dir / "split.csv")
    if external is None:
        data = load_split_data(run_dir, config, {options.split, TUNING_SPLIT})
    else:
        data = load_split_data(run_dir, config, {TUNING_SPLIT})
        data[options.split] = load_external(external, config, options.split)
    sources = load_sources(
        external or Path(config.prepared), options.labels, options.labels_file, options.boxes
    )
    logits = {
        name: predict_sample_logits(
            model,
            part.dataset,
            options.mc_samples,
            options.mc_mode,
            options.batch_size,
            options.seed,
        )  # fmt: skip
        for name, part in data.items()
    }
    evaluated, tuning = data[options.split], data[TUNING_SPLIT]
    metrics: dict = {"split": options.split, "checkpoint": str(checkpoint), "notes": []}
    if external is not None:
        metrics["external"] = _external_record(external, split, evaluated)
        metrics["notes"].extend(_external_notes(metrics["external"]))
    temperature = None
    if options.temperature_scale:
        fit = fit_temperature(logits[TUNING_SPLIT], tuning.y)
        temperature = fit.values
        _note_scaling(metrics, fit, options, len(tuning.rows))
    elif (temperature := read_temperature(run_dir)) is not None:
        # The predictor that predict, the API and the service use: the run's saved temperatures.
        metrics["temperature"] = dict(zip(LABELS, temperature.tolist(), strict=True))
        metrics["notes"].append(
            "the run's temperature.json (from an earlier --temperature-scale) is applied"
        )
    samples = apply_temperature(logits[options.split], 1.0 if temperature is None else temperature)
    val_samples = apply_temperature(
        logits[TUNING_SPLIT], 1.0 if temperature is None else temperature
    )
    summary = summarise_samples(samples)
    # Expert labels, NIH boxes, calibration.json and the "before" reliability use the unscaled
    # MC means; without temperatures they are the summary itself.
    plain = (
        summary
        if temperature is None
        else summarise_samples(apply_temperature(logits[options.split], 1.0))
    )
    _add_metrics(metrics, evaluated, summary, val_samples.mean(axis=0), tuning.y, options)
    if temperature is not None:
        metrics["calibration_before_temperature"] = calibration_summary(evaluated.y, plain["mean"])
    shown = split if external is None else evaluated.rows
    with _staged(out) as staging:
        table = predictions_table(evaluated.rows, summary, options.threshold)
        write_atomic(staging / "predictions.csv", to_csv(table))
        metrics["uncertainty"]["flagged"] = int(table["flag"].sum())
        trust, trust_sections = trust_results(
            sources, staging, run_dir, model, evaluated.dataset, evaluated.rows,
            plain["mean"], plain["uncertainty"], config.input_size, options.bootstrap,
            options.seed,
        )  # fmt: skip
        metrics.update(trust)
        if "conformal" in trust:
            metrics["notes"].extend(_conformal_notes(load_calibration(run_dir), options))
        write_atomic(staging / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
        figures = evaluation_figures(
            staging, evaluated.rows, evaluated.y, samples, summary, metrics["referral"],
            None if temperature is None else plain["mean"],
        )  # fmt: skip
        figures |= example_figures(
            staging, model, evaluated.dataset, evaluated.rows, evaluated.y, summary,
            options.examples,
        )  # fmt: skip
        write_evaluation_report(
            staging, run_dir, config.to_yaml(), shown, metrics, figures, trust_sections
        )
    if options.temperature_scale:
        scaling = metrics["temperature_scaling"]
        write_temperature(run_dir, temperature, scaling["fitted_on"], scaling["fit"])
    log.info("evaluation of %s written to %s", run_dir, out)
    return out


def _external_record(prepared: Path, run_split: pd.DataFrame, evaluated: SplitData) -> dict:
    """Where the external images come from, which findings they score, what they share."""
    y = evaluated.y
    scored = [
        label
        for label, column in zip(LABELS, y.T, strict=True)
        if (column == 1).any() and (column == 0).any()
    ]
    return {"prepared": str(prepared.resolve()), "scored": scored} | overlap(
        run_split, evaluated.rows
    )


def _external_notes(record: dict) -> list[str]:
    """Say when the "external" data is not external, and what is not scored."""
    notes = [
        f"external validation on {record['prepared']}: {len(record['scored'])} of "
        f"{len(LABELS)} findings scored (those it reports with positives and negatives)"
    ]
    if record["shared_images"] or record["shared_patients"]:
        notes.append(
            f"not independent: {record['shared_images']} evaluated images and "
            f"{record['shared_patients']} images of shared patients are also in the run's "
            "split.csv (the training source)"
        )
    return notes


def _conformal_notes(calibration: Calibration, options: EvaluateOptions) -> list[str]:
    """When the realised rates on this split do not test the guarantee as calibrated."""
    notes = []
    fitted = (calibration.mc_samples, calibration.mc_mode)
    if fitted != (options.mc_samples, options.mc_mode):
        notes.append(
            f"calibration.json was fitted on {fitted[0]} MC samples ({fitted[1]} mode), this "
            f"evaluation used {options.mc_samples} ({options.mc_mode}): its bound is for the former"
        )
    if options.split == TUNING_SPLIT:
        notes.append(
            f"calibration.json was fitted on the {TUNING_SPLIT} split evaluated here: its "
            "realised false-negative rates are optimistic"
        )
    return notes


def _note_scaling(
    metrics: dict, fit: TemperatureFit, options: EvaluateOptions, n_images: int
) -> None:
    """Record the fitted temperatures, and warn when they are judged on their own data."""
    metrics["temperature"] = dict(zip(LABELS, fit.values.tolist(), strict=True))
    metrics["temperature_scaling"] = {
        "fitted_on": {
            "split": TUNING_SPLIT,
            "images": n_images,
            "mc_samples": options.mc_samples,
            "mc_mode": options.mc_mode,
            "seed": options.seed,
        },
        "fit": fit.record(),
    }
    if options.split == TUNING_SPLIT:
        note = (
            f"temperatures were fitted on the {TUNING_SPLIT} split that is evaluated here: "
            "its calibration after scaling is optimistic"
        )
        log.warning(note)
        metrics["notes"].append(note)


def _add_metrics(
    metrics: dict,
    evaluated: SplitData,
    summary: dict[str, np.ndarray],
    val_mean: np.ndarray,
    val_y: np.ndarray,
    options: EvaluateOptions,
) -> None:
    """AUC with CIs, AUPRC, operating points, subgroups, calibration, referral, uncertainty."""
    y, mean, rows = evaluated.y, summary["mean"], evaluated.rows
    metrics["auc"] = auc_summary(
        y, mean, rows["Patient ID"].to_numpy(), n_resamples=options.bootstrap, seed=options.seed
    )
    known = (~np.isnan(y)).sum(axis=0)
    prevalence = np.where(known > 0, (y == 1).sum(axis=0) / np.maximum(known, 1), np.nan)
    auprc = per_class_average_precision(y, mean)
    metrics["auprc"] = {
        "classes": {
            label: {
                "auprc": json_number(a),
                "prevalence": json_number(p),
            }
            for label, a, p in zip(LABELS, auprc, prevalence, strict=True)
        }
    }
    metrics["operating_points"] = operating_points(val_y, val_mean, y, mean)
    metrics["subgroups"] = subgroup_aucs(rows, y, mean)
    if not metrics["subgroups"]:
        metrics["subgroups_note"] = (
            "split.csv has no Patient Gender, Patient Age or View Position columns (prepared "
            "before they were kept): subgroups skipped; run `cxrfusion prepare` again to add them"
        )
        metrics["notes"].append(metrics["subgroups_note"])
    metrics["calibration"] = calibration_summary(y, mean)
    metrics["referral"] = referral_curve(y, mean, summary["uncertainty"])
    metrics["uncertainty"] = {
        "mc_samples": options.mc_samples,
        "mc_mode": options.mc_mode,
        "threshold": options.threshold,
        "mean_uncertainty": float(summary["uncertainty"].mean()),
        "mean_mutual_information": float(summary["mutual_information"].mean()),
    }
    metrics["counts"] = {"images": len(rows), "patients": int(rows["Patient ID"].nunique())}
    metrics["options"] = asdict(options)
