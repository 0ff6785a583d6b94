"""Compare evaluated runs on the same images: per-class AUC of each and paired tests (Table 2).

Each run's evaluation folder holds a `predictions.csv` (one row per image: `Image Index`,
`Patient ID`, the 14 mean probabilities named after the labels and the truth as `true_<label>`).
The runs must have been evaluated on the same images with the same labels, because the test is
paired. The test is DeLong's in Obuchowski's patient-clustered form: several radiographs of one
patient are not independent cases, which plain DeLong assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.atomic import atomic_path, write_atomic
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.expert_labels import expert_comparison
from cxrfusion.evaluation.predictions import PATIENT, PREDICTIONS, TRUE_COLUMNS, read_predictions
from cxrfusion.evaluation.report import Section, render_html, render_markdown
from cxrfusion.labels import LABELS
from cxrfusion.stats.delong import clustered_delong_test, holm
from cxrfusion.stats.metrics import macro_auc, per_class_auc

logger = logging.getLogger(__name__)

MACRO = "Macro"


@dataclass(frozen=True)
class ComparisonResult:
    """The comparison table and what it was computed from.

    Attributes:
        table: index = the 14 labels then "Macro"; columns `positives`, one AUC column per model
            (named after it), then per non-reference model `p (<name> vs <reference>)`: the
            patient-clustered DeLong two-sided p-value, Holm-corrected across the classes tested;
            NaN where untestable (fewer than two patients with a positive or a negative image)
            and in the Macro row.
        names: the models, in input order.
        reference: the model the others are tested against.
        eval_dirs: the evaluation folders, in input order.
        n_images: images compared (the same in every run).
        n_patients: the patients those images belong to.
    """

    table: pd.DataFrame
    names: list[str]
    reference: str
    eval_dirs: list[Path]
    n_images: int
    n_patients: int


def p_column(name: str, reference: str) -> str:
    """Name of the table column with the p-values of `name` against `reference`."""
    return f"p ({name} vs {reference})"


def _default_name(eval_dir: Path) -> str:
    """`runs/fusion/eval_test` -> fusion: an evaluation folder is named after its split."""
    eval_dir = Path(eval_dir).resolve()
    return eval_dir.parent.name if eval_dir.name.startswith("eval") else eval_dir.name


def _aligned(eval_dirs: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Truth (N, 14), each run's probabilities (N, 14) and the patient of each image (N,).

    Rows follow the first run's image order.
    """
    frames = [read_predictions(d) for d in eval_dirs]
    first = frames[0]
    for eval_dir, frame in zip(eval_dirs[1:], frames[1:], strict=True):
        path = Path(eval_dir) / PREDICTIONS
        only_here = frame.index.difference(first.index)
        only_first = first.index.difference(frame.index)
        if len(only_here) or len(only_first):
            raise CxrError(
                f"{path}: its {len(frame)} images differ from the {len(first)} of "
                f"{Path(eval_dirs[0]) / PREDICTIONS} ({len(only_here)} only here, "
                f"{len(only_first)} only there); compare runs evaluated on the same split"
            )
        same = frame.loc[first.index, [PATIENT, *TRUE_COLUMNS]]
        if not same.equals(first[[PATIENT, *TRUE_COLUMNS]]):
            raise CxrError(f"{path}: its patients or true labels differ from {eval_dirs[0]}")
    y = first[TRUE_COLUMNS].to_numpy(dtype=float)
    probs = [frame.loc[first.index, list(LABELS)].to_numpy(dtype=float) for frame in frames]
    return y, probs, first[PATIENT].to_numpy()


def _holm_clustered_delong(
    y: np.ndarray, prob: np.ndarray, prob_reference: np.ndarray, patients: np.ndarray
) -> np.ndarray:
    """Per-class patient-clustered DeLong p-values of one model against the reference, Holm."""
    raw = []
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])  # each class on its known labels
        raw.append(
            clustered_delong_test(
                y[known, c], prob[known, c], prob_reference[known, c], patients[known]
            )["p_value"]
        )
    return holm(np.array(raw))


def _reference_name(reference: str | Path | None, names: list[str], eval_dirs: list[Path]) -> str:
    """The reference given as a model name or as one of the compared folders; default the first."""
    if reference is None:
        return names[0]
    if str(reference) in names:
        return str(reference)
    wanted = Path(reference).resolve()
    for name, eval_dir in zip(names, eval_dirs, strict=True):
        if wanted in (eval_dir.resolve(), eval_dir.resolve().parent):
            return name
    raise CxrError(
        f"--reference {reference}: neither a model name ({', '.join(names)}) nor a compared folder"
    )


def compare_runs(
    eval_dirs: Sequence[Path],
    names: Sequence[str] | None = None,
    reference: str | Path | None = None,
) -> ComparisonResult:
    """Per-class AUC of several runs on the same images, with paired tests against a reference.

    Args:
        eval_dirs: evaluation folders, each holding a `predictions.csv`.
        names: one display name per folder; default: the run folder's name (the parent of an
            `eval_*` folder, otherwise the folder itself).
        reference: the model the others are tested against, as a name or as one of the
            folders (or its run folder); default: the first. Never chosen from the results:
            picking the best model on the test set and testing the others against it would
            bias the p-values.

    Raises:
        CxrError: a predictions file is missing or malformed, the runs' images or labels differ,
            names are duplicated or do not match the folders, or `reference` is not a name.
    """
    eval_dirs = [Path(d) for d in eval_dirs]
    if not eval_dirs:
        raise ValueError("compare_runs needs at least one evaluation folder")
    names = [_default_name(d) for d in eval_dirs] if names is None else list(names)
    if len(names) != len(eval_dirs):
        raise CxrError(f"got {len(names)} names for {len(eval_dirs)} evaluation folders")
    if len(set(names)) != len(names):
        raise CxrError(f"model names must be unique, got {', '.join(names)}; pass names")
    reference = _reference_name(reference, names, eval_dirs)
    y, probs, patients = _aligned(eval_dirs)

    aucs = {name: per_class_auc(y, prob) for name, prob in zip(names, probs, strict=True)}
    macros = {name: macro_auc(auc) for name, auc in aucs.items()}
    logger.info("comparing %d runs on %d images, reference %s", len(names), len(y), reference)

    index = [*LABELS, MACRO]
    table = pd.DataFrame(index=pd.Index(index, name="label"))
    positive = y == 1
    table["positives"] = [*positive.sum(axis=0).tolist(), int(positive.any(axis=1).sum())]
    for name in names:
        table[name] = [*aucs[name], macros[name]]
    prob_reference = probs[names.index(reference)]
    for name, prob in zip(names, probs, strict=True):
        if name != reference:
            p_values = _holm_clustered_delong(y, prob, prob_reference, patients)
            table[p_column(name, reference)] = [*p_values, np.nan]
    return ComparisonResult(
        table, names, reference, eval_dirs, len(y), int(len(np.unique(patients)))
    )


def _format_p(p: float) -> str:
    """A p-value for reading: 3 significant digits, "< 0.001" below that, blank when untested."""
    if np.isnan(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def _display_table(result: ComparisonResult) -> pd.DataFrame:
    """The table with AUCs to 3 decimals and readable p-values, as text."""
    shown = result.table.astype(object)
    for column in shown.columns:
        if column.startswith("p ("):
            shown[column] = [_format_p(p) for p in result.table[column]]
        elif column in result.names:
            shown[column] = [f"{a:.3f}" if not np.isnan(a) else "" for a in result.table[column]]
    return shown


def _notes(result: ComparisonResult) -> str:
    return (
        f"AUC per pathology of each model on the same {result.n_images:,} images of "
        f"{result.n_patients:,} patients; Macro is the mean over the classes with positives and "
        "negatives, and its positives count is the images with at least one finding. "
        f"Reference: {result.reference} (as given, or the first model listed). "
        "p: two-sided paired test of each model against the reference, DeLong's test "
        "clustered by patient (Obuchowski 1997: a patient's images are not independent), "
        "Holm-corrected across the classes tested; blank where fewer than two patients have a "
        "positive or a negative image."
    )


def write_comparison(result: ComparisonResult, out: Path) -> list[Path]:
    """Write `comparison.csv` (full precision), `comparison.md` and `comparison.html` into `out`.

    The CSV has the table's columns, `label` first; NaN is an empty cell. The Markdown and the
    self-contained HTML show AUCs to 3 decimals and p-values to 3 significant digits.

    Args:
        out: folder to write into (created if missing).

    Returns:
        The three paths: md, csv, html.
    """
    out = Path(out)
    title = "Model comparison"
    section = Section(
        "Per-class ROC-AUC and patient-clustered DeLong tests",
        text=_notes(result)
        + "\n\n"
        + "\n".join(f"- {n}: {d}" for n, d in zip(result.names, result.eval_dirs, strict=True)),
        table=_display_table(result),
    )
    sections = [section, *_expert_sections(result)]
    md_path = write_atomic(out / "comparison.md", render_markdown(title, sections, out))
    csv_path = out / "comparison.csv"
    with atomic_path(csv_path) as tmp:
        result.table.to_csv(tmp)
    html_path = write_atomic(out / "comparison.html", render_html(title, sections))
    return [md_path, csv_path, html_path]


def _expert_sections(result: ComparisonResult) -> list[Section]:
    """The expert-label AUCs of the runs evaluated with `--labels google2019`, if any."""
    table = expert_comparison(result.eval_dirs, result.names)
    if table is None:
        return []
    return [
        Section(
            "Expert-label ROC-AUC (Google 2019)",
            text="AUC against radiologist labels on each run's images that carry them; blank "
            "for a run evaluated without --labels google2019.",
            table=table,
        )
    ]
