"""`cxrfusion external`: one run on its own test data and on another data set, side by side.

How far does a model trained on one hospital's images carry to another's? Per finding the data
sets share: prevalence, ROC-AUC with patient-bootstrap intervals on each, the AUC difference
(external - internal) with its interval (the two sets' patients are independent, so each is
resampled on its own), sensitivity and specificity at the operating points chosen on the run's
own validation split, and calibration (ECE) on each. Both sides are `evaluate` folders (made
here when missing), so every number is recomputable from their predictions.csv.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.atomic import atomic_path
from cxrfusion.checks import check_choice, check_number
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate
from cxrfusion.evaluation.plots import plot_forest
from cxrfusion.evaluation.predictions import PATIENT, TRUE_COLUMNS, read_predictions
from cxrfusion.evaluation.report import Section, write_report
from cxrfusion.inference.runs import resolve_checkpoint
from cxrfusion.labels import LABELS
from cxrfusion.stats.calibration import expected_calibration_error
from cxrfusion.stats.metrics import unpaired_bootstrap_auc_difference

log = logging.getLogger(__name__)

MACRO = "Macro"
# evaluate's options that an evaluation reused here must have been made with.
_MATCHED = ("mc_samples", "mc_mode", "seed")


@dataclass(frozen=True)
class ExternalOptions:
    """How to compare a run's internal and external evaluations.

    Args:
        split: the external folder's split ("test", or "all" for every image).
        internal_split: the run's own split to compare against (its test split by default).
        mc_samples, mc_mode, seed, batch_size: as in `EvaluateOptions`, for evaluations made here.
        bootstrap: patient-bootstrap resamples for every interval.
        reevaluate: evaluate both sides anew even where an evaluation exists.
    """

    split: str = "test"
    internal_split: str = "test"
    mc_samples: int = 25
    mc_mode: str = "head"
    seed: int = 0
    batch_size: int = 64
    bootstrap: int = 1000
    reevaluate: bool = False

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("test", "val", "train", "all"))
        check_choice("internal_split", self.internal_split, ("test", "val", "train"))
        check_number("bootstrap", self.bootstrap, integer=True, low=1)

    def evaluate_options(self, split: str, prepared: Path | None) -> EvaluateOptions:
        return EvaluateOptions(
            split=split,
            mc_samples=self.mc_samples,
            mc_mode=self.mc_mode,
            seed=self.seed,
            batch_size=self.batch_size,
            bootstrap=self.bootstrap,
            prepared=None if prepared is None else str(prepared),
        )


@dataclass(frozen=True)
class Side:
    """One evaluation folder: its metrics.json and predictions.csv."""

    folder: Path
    metrics: dict
    predictions: pd.DataFrame

    @property
    def y(self) -> np.ndarray:
        return self.predictions[TRUE_COLUMNS].to_numpy(dtype=float)

    @property
    def probabilities(self) -> np.ndarray:
        return self.predictions[list(LABELS)].to_numpy(dtype=float)

    @property
    def patients(self) -> np.ndarray:
        return self.predictions[PATIENT].to_numpy()


def external_validation(
    run: Path, prepared: Path, out: Path | None = None, options: ExternalOptions = ExternalOptions()
) -> Path:
    """Compare `run` on its own split and on the prepared folder `prepared`; returns `out`.

    Writes external.csv (full precision), external.md, external.html and forest.png into `out`
    (default: inside the external evaluation folder, `<run>/external_<name>_<split>/vs_internal`).

    Raises:
        CxrError: an existing evaluation was made with other MC options than asked, or the
            two with different temperatures (rerun with `reevaluate`), or the data sets share
            no scored finding.
    """
    run_dir = resolve_checkpoint(run).parent
    prepared = Path(prepared)
    internal = _side(run, run_dir / f"eval_{options.internal_split}", options, None)
    external_dir = run_dir / f"external_{prepared.resolve().name}_{options.split}"
    external = _side(run, external_dir, options, prepared)
    _check_temperatures(internal, external)
    table = comparison_table(internal, external, options.bootstrap, options.seed)
    if len(table) == 1:
        raise CxrError(
            f"{prepared}: no finding has positives and negatives in both the run's "
            f"{options.internal_split} split and this data: nothing to compare"
        )
    out = Path(out) if out else external_dir / "vs_internal"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "external.csv") as tmp:
        table.to_csv(tmp, float_format="%.17g")
    forest = plot_forest(
        {
            f"{measure}_{key}": table[f"{measure}_{name}"].to_numpy(dtype=float)
            for measure in ("auc", "ci_low", "ci_high")
            for key, name in (("a", "internal"), ("b", "external"))
        },
        [*table.index, f"internal ({options.internal_split})", f"external ({prepared.name})"],
        out / "forest.png",
    )
    write_report(
        out, "External validation", _sections(internal, external, table, forest), "external"
    )
    log.info("external validation of %s written to %s", run_dir, out)
    return out


def _side(run: Path, folder: Path, options: ExternalOptions, prepared: Path | None) -> Side:
    """The evaluation in `folder`, made first when it is missing (or `reevaluate`).

    Raises:
        CxrError: the existing evaluation used other MC options than asked for.
    """
    split = options.split if prepared is not None else options.internal_split
    wanted = options.evaluate_options(split, prepared)
    if options.reevaluate or not (folder / "metrics.json").is_file():
        log.info("evaluating %s into %s", run, folder)
        evaluate(run, None, wanted)
    metrics = json.loads((folder / "metrics.json").read_text())
    if resolve_checkpoint(run).stat().st_mtime > (folder / "metrics.json").stat().st_mtime:
        raise CxrError(
            f"{folder}: evaluated before {resolve_checkpoint(run)} was last written (a resumed "
            "run?): use --reevaluate to evaluate both sides with the checkpoint as it is"
        )
    for key in _MATCHED:
        used, asked = metrics["options"][key], getattr(wanted, key)
        if used != asked:
            raise CxrError(
                f"{folder}: evaluated with {key}={used}, not {asked} as asked: use "
                "--reevaluate to evaluate both sides anew with the same options"
            )
    return Side(folder, metrics, read_predictions(folder))


def _check_temperatures(internal: Side, external: Side) -> None:
    """Both sides must come from the same predictor: the run's temperatures then and now."""
    if internal.metrics.get("temperature") != external.metrics.get("temperature"):
        raise CxrError(
            f"{internal.folder} and {external.folder} were evaluated with different "
            "temperatures: use --reevaluate to evaluate both with the run's temperature.json"
        )


def _prevalence(y: np.ndarray) -> np.ndarray:
    known = (~np.isnan(y)).sum(axis=0)
    return np.where(known > 0, (y == 1).sum(axis=0) / np.maximum(known, 1), np.nan)


def _operating_point(side: Side, label: str, rule: str, key: str) -> float:
    value = side.metrics["operating_points"]["classes"][label][rule][key]
    return np.nan if value is None else value


def comparison_table(internal: Side, external: Side, n_resamples: int, seed: int) -> pd.DataFrame:
    """Per finding scored on both sides (then Macro): the side-by-side figures, full precision.

    Columns (suffix `_internal` / `_external`): positives, prevalence, auc with ci_low/ci_high,
    sensitivity and specificity at the validation-chosen Youden threshold (`threshold`) and at
    the target-sensitivity threshold (`_at_target`), ece; and `auc_difference` (external -
    internal) with `difference_ci_low` / `difference_ci_high`, and `resamples_valid`: how many
    of the resamples had the finding (every finding, for Macro) defined on both sides.
    """
    diff = unpaired_bootstrap_auc_difference(
        (internal.y, internal.probabilities, internal.patients),
        (external.y, external.probabilities, external.patients),
        n_resamples=n_resamples,
        seed=seed,
    )
    columns: dict[str, np.ndarray] = {}
    for name, side, key in (("internal", internal, "a"), ("external", external, "b")):
        columns[f"positives_{name}"] = (side.y == 1).sum(axis=0)
        columns[f"prevalence_{name}"] = _prevalence(side.y)
        columns[f"auc_{name}"] = diff[f"auc_{key}"]
        columns[f"ci_low_{name}"] = diff[f"ci_low_{key}"]
        columns[f"ci_high_{name}"] = diff[f"ci_high_{key}"]
    columns["auc_difference"] = diff["difference"]
    columns["difference_ci_low"] = diff["ci_low"]
    columns["difference_ci_high"] = diff["ci_high"]
    columns["resamples_valid"] = diff["n_valid"]  # of `n_resamples`: the intervals rest on these
    for rule, suffix in (("youden", ""), ("sensitivity_target", "_at_target")):
        columns[f"threshold{suffix}"] = np.array(
            [_operating_point(internal, label, rule, "threshold") for label in LABELS]
        )
        for name, side in (("internal", internal), ("external", external)):
            for measure in ("sensitivity", "specificity"):
                columns[f"{measure}{suffix}_{name}"] = np.array(
                    [_operating_point(side, label, rule, measure) for label in LABELS]
                )
    for name, side in (("internal", internal), ("external", external)):
        columns[f"ece_{name}"] = expected_calibration_error(side.y, side.probabilities, axis=0)
    table = pd.DataFrame(columns, index=pd.Index(LABELS, name="finding"))[diff["in_macro"]]
    macro = {
        "auc_internal": diff["macro_a"],
        "ci_low_internal": diff["macro_ci_low_a"],
        "ci_high_internal": diff["macro_ci_high_a"],
        "auc_external": diff["macro_b"],
        "ci_low_external": diff["macro_ci_low_b"],
        "ci_high_external": diff["macro_ci_high_b"],
        "auc_difference": diff["macro_difference"],
        "difference_ci_low": diff["macro_ci_low"],
        "difference_ci_high": diff["macro_ci_high"],
        "resamples_valid": diff["macro_n_valid"],
    }
    table.loc[MACRO] = pd.Series(macro)
    return table


def _intervals(table: pd.DataFrame, low: str, high: str) -> list[str]:
    return [
        "" if np.isnan(lo) or np.isnan(hi) else f"{lo:.3f} - {hi:.3f}"
        for lo, hi in zip(table[low], table[high], strict=True)
    ]


def _number(value: float, digits: int = 3) -> str:
    return "" if np.isnan(value) else f"{value:.{digits}f}"


def _discrimination(table: pd.DataFrame) -> pd.DataFrame:
    """AUCs and the difference with their intervals, as text for the report."""
    shown = pd.DataFrame(index=table.index)
    for name in ("internal", "external"):
        shown[f"prevalence {name}"] = [_number(v) for v in table[f"prevalence_{name}"]]
    for name in ("internal", "external"):
        shown[f"AUC {name}"] = [_number(v) for v in table[f"auc_{name}"]]
        shown[f"95 % CI {name}"] = _intervals(table, f"ci_low_{name}", f"ci_high_{name}")
    shown["difference"] = [f"{v:+.3f}" for v in table["auc_difference"]]
    shown["95 % CI difference"] = _intervals(table, "difference_ci_low", "difference_ci_high")
    shown["valid resamples"] = [f"{int(v):,}" for v in table["resamples_valid"]]
    return shown


def _operating(table: pd.DataFrame) -> pd.DataFrame:
    """Sensitivity/specificity at the internal Youden thresholds and ECE, as text."""
    findings = table.drop(index=MACRO)
    shown = pd.DataFrame(index=findings.index)
    shown["threshold"] = [_number(v, 4) for v in findings["threshold"]]
    for measure in ("sensitivity", "specificity", "ece"):
        for name in ("internal", "external"):
            shown[f"{measure} {name}"] = [_number(v) for v in findings[f"{measure}_{name}"]]
    return shown


def _sections(internal: Side, external: Side, table: pd.DataFrame, forest: Path) -> list[Section]:
    record = external.metrics.get("external", {})
    counts = (
        f"internal: {internal.metrics['counts']['images']:,} images of "
        f"{internal.metrics['counts']['patients']:,} patients ({internal.folder}); external: "
        f"{external.metrics['counts']['images']:,} images of "
        f"{external.metrics['counts']['patients']:,} patients ({external.folder})"
    )
    sections = []
    if record.get("shared_images") or record.get("shared_patients"):
        sections.append(
            Section(
                "Not independent",
                text=f"The external data shares {record['shared_images']} images and "
                f"{record['shared_patients']} images of patients with the run's split.csv "
                "(its training source, e.g. an NIH-derived label set): the comparison "
                "overstates how well the model carries to new patients.",
            )
        )
    unscored = [label for label in LABELS if label not in table.index]
    sections += [
        Section(
            "Discrimination",
            text=f"{counts}.\n\nPer finding scored on both sides (positives and negatives "
            "among the known labels of each); Macro averages those findings. Intervals: 95 % "
            "patient-bootstrap percentile intervals, each data set resampled by patient on its "
            "own; difference = external - internal. Valid resamples: those in which the "
            "finding (for Macro, every finding) had positives and negatives on both sides; an "
            "interval resting on far fewer than all of them is fragile."
            + (
                f"\n\nNot compared (unscored on one side): {', '.join(unscored)}."
                if unscored
                else ""
            ),
            table=_discrimination(table),
        ),
        Section("Forest plot", figure=forest, caption="AUC with 95 % CI, internal vs external."),
        Section(
            "Operating points and calibration",
            text="Sensitivity and specificity at the Youden threshold chosen on the run's own "
            "validation split (the same threshold on both sides; external.csv also has the "
            "target-sensitivity threshold), and per-finding ECE (15 bins).",
            table=_operating(table),
        ),
    ]
    return sections
