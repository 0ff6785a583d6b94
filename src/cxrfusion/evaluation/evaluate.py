"""`cxrfusion evaluate`: predictions with MC dropout > metrics > figures > report, for one run."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit

from cxrfusion.atomic import write_atomic
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.split import read_split
from cxrfusion.errors import CxrError
from cxrfusion.evaluation import plots
from cxrfusion.evaluation.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from cxrfusion.evaluation.metrics import auc_summary
from cxrfusion.evaluation.predictions import (
    model_input,
    predict_logits,
    predict_samples,
    predictions_table,
)
from cxrfusion.evaluation.referral import referral_curve
from cxrfusion.evaluation.report import Section, auc_table, calibration_table, write_report
from cxrfusion.evaluation.trust import load_sources, trust_results
from cxrfusion.evaluation.uncertainty import summarise_samples
from cxrfusion.explain import gradcam, save_gradcam_figure
from cxrfusion.inference import load_run, resolve_checkpoint
from cxrfusion.labels import LABELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateOptions:
    """How to evaluate a run.

    Args:
        split: which split of the run's split.csv to evaluate (test, val or train).
        mc_samples: T Monte-Carlo dropout passes (25 in the report).
        mc_mode: "head" (backbone once, head T times: same distribution, ~T times cheaper) or
            "full" (T whole passes, for models with dropout outside the head).
        threshold: per-image uncertainty (mean of the 14 stds) above which an image is flagged.
        temperature_scale: fit one temperature per class on the validation split.
        bootstrap: patient-level bootstrap resamples for the 95 % CIs.
        seed: seed of the dropout masks and of the bootstrap.
        batch_size: images per forward pass.
        examples: images shown in the prediction grid and explained with Grad-CAM.
        labels: "google2019" scores the images with Google's 2019 expert labels too.
        labels_file: the expert label file (default: beside the NIH table).
        boxes: localisation against NIH's boxes: None (off), "" (the file beside the NIH table)
            or the box file.
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


def _calibration(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "ECE": expected_calibration_error(y, p),
        "Brier": brier_score(y, p),
        "NLL": nll(y, p),
    }


def _scaled(samples: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """Each dropout sample's probability after dividing its logit by the class temperature."""
    clipped = np.clip(samples.astype(np.float64), 1e-7, 1 - 1e-7)
    return expit(logit(clipped) / temperature)


def evaluate(
    run: Path, out: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> Path:
    """Evaluate a run directory (or a checkpoint in one); returns the folder with report.html.

    Writes predictions.csv, metrics.json, the figures and report.html / report.md into `out`
    (default: <run>/eval_<split>).
    """
    checkpoint = resolve_checkpoint(run)
    run_dir = checkpoint.parent
    out = Path(out) if out else run_dir / f"eval_{options.split}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, config = load_run(checkpoint, device)
    model = module.model.to(memory_format=torch.channels_last)
    split = read_split(run_dir / "split.csv")
    datasets = split_datasets(
        Path(config.prepared),
        config.cache_size,
        config.input_size,
        split_file=run_dir / "split.csv",
    )
    if options.split not in datasets or len(datasets[options.split]) == 0:
        raise CxrError(f"{run_dir / 'split.csv'}: the {options.split!r} split is empty")
    dataset, rows = datasets[options.split], split[split["split"] == options.split]
    sources = load_sources(
        Path(config.prepared), options.labels, options.labels_file, options.boxes
    )

    samples = predict_samples(
        model, dataset, options.mc_samples, options.mc_mode, options.batch_size, options.seed
    )
    raw_samples = samples
    y = rows[list(LABELS)].to_numpy()
    metrics: dict = {"split": options.split, "checkpoint": str(checkpoint)}
    temperature = None
    if options.temperature_scale:
        val = datasets["val"]
        temperature = fit_temperature(predict_logits(model, val), val.targets.numpy())
        before = _calibration(y, samples.mean(axis=0))
        samples = _scaled(samples, temperature)
        metrics["temperature"] = dict(zip(LABELS, temperature.tolist(), strict=True))
    summary = summarise_samples(samples)
    out.mkdir(parents=True, exist_ok=True)
    table = predictions_table(rows, summary, options.threshold)
    write_atomic(out / "predictions.csv", table.to_csv(index=False, float_format="%.6g"))

    mean = summary["mean"]
    metrics["auc"] = auc_summary(
        y, mean, rows["Patient ID"].to_numpy(), n_resamples=options.bootstrap, seed=options.seed
    )
    metrics["calibration"] = _calibration(y, mean)
    if temperature is not None:
        metrics["calibration_before_temperature"] = before
    metrics["referral"] = referral_curve(y, mean, summary["uncertainty"])
    metrics["uncertainty"] = {
        "mc_samples": options.mc_samples,
        "mc_mode": options.mc_mode,
        "threshold": options.threshold,
        "flagged": int(table["flag"].sum()),
        "mean_uncertainty": float(summary["uncertainty"].mean()),
        "mean_mutual_information": float(summary["mutual_information"].mean()),
    }
    metrics["counts"] = {"images": len(rows), "patients": int(rows["Patient ID"].nunique())}
    metrics["options"] = asdict(options)
    # Trust checks (expert labels, NIH boxes, calibration.json) score the unscaled MC means.
    plain = summary if temperature is None else summarise_samples(raw_samples)
    extra, extra_sections = trust_results(
        sources,
        out,
        run_dir,
        model,
        dataset,
        rows,
        plain["mean"],
        plain["uncertainty"],
        config.input_size,
        options.bootstrap,
        options.seed,
    )
    metrics.update(extra)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))

    figures = _figures(out, model, dataset, rows, y, samples, summary, metrics["referral"], options)
    _report(out, run_dir, config, split, metrics, figures, extra_sections)
    log.info("evaluation of %s written to %s", run_dir, out)
    return out


def _examples(summary: dict[str, np.ndarray], count: int) -> np.ndarray:
    """Positions of the most uncertain half and the most confident half of `count` images."""
    order = np.argsort(summary["uncertainty"], kind="stable")
    uncertain, confident = order[::-1][: (count + 1) // 2], order[: count // 2]
    return np.concatenate([uncertain, confident])


def _figures(
    out: Path,
    model,
    dataset,
    rows: pd.DataFrame,
    y: np.ndarray,
    samples: np.ndarray,
    summary: dict[str, np.ndarray],
    referral: dict,
    options: EvaluateOptions,
) -> dict[str, Path]:
    mean = summary["mean"]
    figures = {
        "roc": plots.plot_roc_curves(y, mean, out / "roc_curves.png"),
        "reliability": plots.plot_reliability(reliability_bins(y, mean), out / "reliability.png"),
        "referral": plots.plot_referral_curve(referral, out / "referral_curve.png"),
    }
    most_uncertain = int(np.argmax(summary["uncertainty"]))
    top = int(np.argmax(mean[most_uncertain]))
    figures["mc_histogram"] = plots.plot_mc_histogram(
        samples[:, most_uncertain, top],
        LABELS[top],
        rows["Image Index"].iloc[most_uncertain],
        out / "mc_histogram.png",
    )
    picked = _examples(summary, options.examples)
    images = np.asarray(dataset.images[dataset.rows[picked]])
    truth = [[label for label, v in zip(LABELS, y[i], strict=True) if v] for i in picked]
    figures["grid"] = plots.plot_prediction_grid(
        images, truth, mean[picked], summary["std"][picked], out / "prediction_grid.png"
    )
    device = next(model.parameters()).device
    for rank, position in enumerate(picked):
        image, _, _ = dataset[int(position)]
        x = model_input(image.unsqueeze(0), device)
        best = np.argsort(-mean[position])[:3]
        heatmaps = {LABELS[c]: gradcam(model, x, int(c)) for c in best}
        probs = {LABELS[c]: float(mean[position, c]) for c in best}
        name = rows["Image Index"].iloc[position]
        figures[f"gradcam {name}"] = save_gradcam_figure(
            image[0].numpy(), heatmaps, probs, out / f"gradcam_{rank}_{Path(name).stem}.png"
        )
    return figures


def _data_table(split: pd.DataFrame) -> pd.DataFrame:
    """Images, patients and positives per split (the data the run was trained and tested on)."""
    groups = split.groupby("split", sort=False)
    table = pd.DataFrame({"images": groups.size(), "patients": groups["Patient ID"].nunique()})
    return pd.concat([table, groups[list(LABELS)].sum()], axis=1).T


def _report(
    out: Path,
    run_dir: Path,
    config,
    split: pd.DataFrame,
    metrics: dict,
    figures: dict[str, Path],
    extra: list[Section],
) -> tuple[Path, Path]:
    auc = metrics["auc"]
    uncertainty = metrics["uncertainty"]
    macro = auc["macro"]
    ci = (
        f" (95 % CI {macro['ci_low']:.3f} - {macro['ci_high']:.3f})"
        if macro["ci_low"] is not None
        else ""
    )
    headline = (
        f"Macro ROC-AUC {macro['auc']:.3f}{ci} on {metrics['counts']['images']:,} "
        f"{metrics['split']} images of {metrics['counts']['patients']:,} patients; "
        f"{uncertainty['flagged']:,} flagged for review (uncertainty above "
        f"{uncertainty['threshold']})."
    )
    before = metrics.get("calibration_before_temperature")
    calibration = (
        calibration_table(before, metrics["calibration"])
        if before
        else calibration_table(metrics["calibration"])
    )
    sections = [
        Section("Summary", text=f"Run: {run_dir}\n\n{headline}"),
        Section(
            "Per-class ROC-AUC",
            table=auc_table(auc),
            figure=figures["roc"],
            caption="ROC curve per pathology; CIs resample patients.",
        ),
        Section("Calibration", table=calibration, figure=figures["reliability"]),
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
        Section("Run config", code=config.to_yaml()),
    ]
    return write_report(out, f"cxrfusion evaluation: {run_dir.name}", sections)
