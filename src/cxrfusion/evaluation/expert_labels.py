"""AUCs against Google's 2019 radiologist relabels of NIH images, beside the NIH-label AUCs.

NIH's labels were text-mined from reports and are noisy. Majkowska et al. (Radiology 2020) had
radiologists adjudicate four findings on 4,376 NIH images (`google2019_nih-chest-xray-labels.csv`,
YES/NO). Three map onto our 14 outputs; the score of a group of pathologies is the highest of their
probabilities (a finding is present if any of its NIH counterparts is):

- Pneumothorax <- Pneumothorax
- Nodule or mass <- max(Nodule, Mass)
- Airspace opacity <- max(Consolidation, Pneumonia, Infiltration)

Fracture has no counterpart among the 14 and is skipped. The NIH-label AUC of the same images uses
the same grouping of NIH's labels (present if any counterpart is), so both columns score one score
against two truths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.errors import CxrError
from cxrfusion.evaluation.report import MISSING, Section
from cxrfusion.labels import LABEL_INDEX
from cxrfusion.stats.metrics import auc_summary
from cxrfusion.tables import read_csv

log = logging.getLogger(__name__)

EXPERT_FILE = "google2019_nih-chest-xray-labels.csv"
MAPPING: dict[str, tuple[str, ...]] = {
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration"),
}
SKIPPED = {"Fracture": "no counterpart among the 14 NIH pathologies"}
FINDINGS = (*MAPPING, *SKIPPED)


def mapping_text() -> dict[str, str]:
    """Expert finding -> how our score for it is computed (for metrics.json and the report)."""
    return {
        finding: labels[0] if len(labels) == 1 else f"max({', '.join(labels)})"
        for finding, labels in MAPPING.items()
    }


def read_expert_labels(path: Path) -> pd.DataFrame:
    """The relabel file as `Image Index` plus one 0/1 column per finding in `FINDINGS`.

    Raises:
        CxrError: unreadable file, a missing column, a value other than YES/NO, a duplicate image.
    """
    path = Path(path)
    raw = read_csv(path, "Google's 2019 expert labels", dtype=str, keep_default_na=False)
    missing = [c for c in ("Image Index", *FINDINGS) if c not in raw.columns]
    if missing:
        raise CxrError(f"{path}: missing column {missing[0]!r}; expected Google's 2019 relabels")
    if raw["Image Index"].duplicated().any():
        first = raw["Image Index"][raw["Image Index"].duplicated()].iloc[0]
        raise CxrError(f"{path}: image {first} appears more than once")
    table = raw[["Image Index"]].copy()
    for finding in FINDINGS:
        values = raw[finding].str.strip().str.upper()
        bad = ~values.isin(("YES", "NO"))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CxrError(
                f"{path}: line {row + 2}: {finding} is {raw[finding].iloc[row]!r}, not YES/NO"
            )
        table[finding] = (values == "YES").astype(np.uint8)
    return table


def grouped(values: np.ndarray) -> np.ndarray:
    """(N, 14) probabilities or 0/1 labels -> (N, 3): the max over each finding's counterparts."""
    values = np.asarray(values)
    return np.stack(
        [
            values[:, [LABEL_INDEX[label] for label in labels]].max(axis=1)
            for labels in MAPPING.values()
        ],
        axis=1,
    )


def expert_label_metrics(
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    expert: pd.DataFrame,
    source: Path,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Expert-label and NIH-label AUCs with patient-bootstrap CIs on the images that have both.

    Args:
        rows: the evaluated split's rows (`Image Index`, `Patient ID`, the 14 NIH labels), in the
            order of `probabilities`.
        probabilities: (N, 14) predicted probabilities.
        expert: `read_expert_labels` output.
        source: the file `expert` came from (recorded).
        n_resamples, seed: of the patient bootstrap.

    Raises:
        CxrError: when no evaluated image has an expert label.
    """
    position = pd.Series(np.arange(len(rows)), index=rows["Image Index"].to_numpy())
    matched = expert[expert["Image Index"].isin(position.index)]
    if matched.empty:
        raise CxrError(f"{source}: none of the {len(rows):,} evaluated images has an expert label")
    where = position[matched["Image Index"]].to_numpy()
    groups = rows["Patient ID"].to_numpy()[where]
    scores = grouped(np.asarray(probabilities)[where])
    findings = list(MAPPING)
    summaries = {
        name: auc_summary(truth, scores, groups, findings, n_resamples, seed)
        for name, truth in (
            ("expert", matched[findings].to_numpy()),
            ("nih", grouped(rows[list(LABEL_INDEX)].to_numpy()[where])),
        )
    }
    log.info("expert labels: %d evaluated images have them", len(where))
    return {
        "source": str(source),
        "reference": "Majkowska et al., Radiology 2020 (Google 2019 relabels)",
        "mapping": mapping_text(),
        "skipped": SKIPPED,
        "n_images": int(len(where)),
        "n_patients": int(len(np.unique(groups))),
        "images": matched["Image Index"].tolist(),
        **summaries,
    }


def _auc_and_ci(entry: dict) -> tuple[float, str]:
    low, high = entry.get("ci_low"), entry.get("ci_high")
    auc = np.nan if entry.get("auc") is None else entry["auc"]
    return auc, MISSING if low is None or high is None else f"{low:.3f} - {high:.3f}"


def expert_table(metrics: dict) -> pd.DataFrame:
    """One row per expert finding (then Macro): mapping, expert AUC and CI, NIH AUC and CI, counts."""
    level = f"{100 * metrics['expert']['level']:g} % CI"
    records = {}
    for finding in [*MAPPING, "Macro"]:
        expert = metrics["expert"]["classes"].get(finding, metrics["expert"]["macro"])
        nih = metrics["nih"]["classes"].get(finding, metrics["nih"]["macro"])
        e_auc, e_ci = _auc_and_ci(expert)
        n_auc, n_ci = _auc_and_ci(nih)
        records[finding] = {
            "our score": metrics["mapping"].get(finding, ""),
            "expert AUC": e_auc,
            f"expert {level}": e_ci,
            "expert positives": expert.get("positives", ""),
            "NIH AUC": n_auc,
            f"NIH {level}": n_ci,
            "NIH positives": nih.get("positives", ""),
        }
    table = pd.DataFrame.from_dict(records, orient="index")
    table.index.name = "expert finding"
    return table


def expert_section(metrics: dict) -> Section:
    """The report's section on expert labels."""
    skipped = "; ".join(f"{k}: {v}" for k, v in metrics["skipped"].items())
    return Section(
        "Expert labels (Google 2019)",
        text=f"{metrics['n_images']:,} evaluated images of {metrics['n_patients']:,} patients carry "
        f"radiologist labels ({metrics['reference']}; {metrics['source']}). Our score for a "
        "finding is the highest probability of its NIH counterparts (column 'our score'); the NIH "
        "columns score the same images against NIH's text-mined labels grouped the same way. "
        f"CIs resample patients. Skipped: {skipped}.",
        table=expert_table(metrics),
    )


def expert_comparison(eval_dirs: Sequence[Path], names: Sequence[str]) -> pd.DataFrame | None:
    """Expert-label AUC per finding (rows) and model (columns) from each folder's metrics.json.

    Returns None when no folder was evaluated with `--labels google2019`; a model evaluated
    without expert labels gets an empty column.
    """
    columns = {}
    for name, eval_dir in zip(names, eval_dirs, strict=True):
        path = Path(eval_dir) / "metrics.json"
        expert = json.loads(path.read_text()).get("expert_labels") if path.is_file() else None
        if expert is not None:
            columns[name] = {
                finding: _auc_and_ci(expert["expert"]["classes"][finding])[0] for finding in MAPPING
            } | {"Macro": _auc_and_ci(expert["expert"]["macro"])[0]}
    if not columns:
        return None
    table = pd.DataFrame(columns, index=[*MAPPING, "Macro"], columns=list(names))
    table.index.name = "expert finding"
    return table
