"""A synthetic dataset in the NIH ChestX-ray14 layout: the built-in demo and test data.

No real X-ray may be committed, so `synthesize` writes a label table and PNGs that look like NIH's:
patients with follow-ups, their findings, and one phantom radiograph per row (`phantoms`, with a
visible sign per pathology). Each patient keeps their anatomy, findings and lesion sites across
follow-ups, so image-wise splits leak.

Labels co-occur as in NIH (Effusion with Cardiomegaly, Edema, Atelectasis; Infiltration with
Pneumonia; ...) and follow NIH's order of prevalence, with about half the images `No Finding`. Expected
image prevalence in %, NIH's in brackets: Infiltration 16 (17.7), Effusion 11 (11.9), Atelectasis 9
(10.3), Nodule 5.6 (5.6), Mass 5.0 (5.2), Pneumothorax 4.4 (4.7), Consolidation 3.7 (4.2),
Pleural_Thickening 3.4 (3.0), Cardiomegaly 2.8 (2.5), Emphysema 2.6 (2.2), Edema 2.4 (2.1), Fibrosis
2.1 (1.5), Pneumonia 1.8 (1.3), Hernia 1.4 (0.2). The rare labels are raised on purpose: 2,000
images then still hold ~25 Hernia positives, enough for a per-class AUC.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxrfusion.atomic import atomic_path
from cxrfusion.checks import check_number
from cxrfusion.data.options import MIN_SIZE
from cxrfusion.data.phantoms import TABLE_STREAM, render, stream
from cxrfusion.labels import LABELS, NO_FINDING, multi_hot

log = logging.getLogger(__name__)

HEADER = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
TABLE_NAME = "Data_Entry_2017.csv"

# Label model. A sick patient has one or two primary findings (drawn by weight) plus comorbid ones;
# each follow-up shows each of the patient's findings with `_PERSIST`, and sometimes a transient one.
# Weights were fitted by simulation to give the image prevalences in the module docstring.
_P_SICK = 0.52
_P_SECOND_PRIMARY = 0.3
_PERSIST = 0.85
_P_TRANSIENT = 0.06
_MAX_FOLLOW_UPS = 10
_WEIGHT = {
    "Infiltration": 0.25,
    "Effusion": 0.142,
    "Atelectasis": 0.103,
    "Nodule": 0.076,
    "Mass": 0.079,
    "Pneumothorax": 0.058,
    "Consolidation": 0.057,
    "Pleural_Thickening": 0.046,
    "Cardiomegaly": 0.044,
    "Emphysema": 0.04,
    "Edema": 0.029,
    "Fibrosis": 0.032,
    "Pneumonia": 0.028,
    "Hernia": 0.02,
}
_COMORBID = {  # P(second finding | first finding), after NIH's co-occurrence table
    "Cardiomegaly": {"Effusion": 0.35, "Edema": 0.15},
    "Edema": {"Effusion": 0.4, "Infiltration": 0.2},
    "Effusion": {"Atelectasis": 0.25},
    "Pneumonia": {"Infiltration": 0.45, "Edema": 0.1},
    "Consolidation": {"Atelectasis": 0.25, "Effusion": 0.15},
    "Emphysema": {"Pneumothorax": 0.2},
    "Mass": {"Nodule": 0.15},
    "Fibrosis": {"Pleural_Thickening": 0.15},
}
_FORMATS = (
    ((2500, 2048), 0.168),
    ((2048, 2500), 0.168),
    ((2992, 2991), 0.143),
    ((3056, 2544), 0.139),
)


def synthesize(out: Path, n: int = 2000, seed: int = 0, size: int = 256, workers: int = 1) -> Path:
    """Write a synthetic NIH-style dataset: `Data_Entry_2017.csv` and `images/*.png`.

    The table is written last (temporary name, then renamed) and any old one is removed first,
    so an interrupted run never leaves a table naming missing or mismatched images.

    Args:
        out: dataset folder to create or overwrite.
        n: number of images.
        seed: everything (table and pixels) follows from it; the same seed gives byte-identical files.
        size: side of the square 8-bit grayscale PNGs, in pixels.
        workers: processes that render images; the output does not depend on it.

    Returns:
        `out`, ready for `cxrfusion prepare --data out`.

    Raises:
        CxrError: for a setting out of range (n or workers below 1, a negative seed, size below 32).
    """
    check_number("n", n, integer=True, low=1)
    check_number("seed", seed, integer=True, low=0, high=2**32 - 1)
    check_number("size", size, integer=True, low=MIN_SIZE)
    check_number("workers", workers, integer=True, low=1)
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / TABLE_NAME).unlink(missing_ok=True)
    rows = _sample_rows(n, stream(seed, TABLE_STREAM))
    tasks = [(images / row[0], row[3], i, row[1], seed, size) for i, row in enumerate(rows)]
    _write_images(tasks, workers)
    with atomic_path(out / TABLE_NAME) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    log.info("wrote %d synthetic images of %d px to %s", n, size, out)
    return out


def _write_images(tasks: list[tuple], workers: int) -> None:
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        done = pool.map(_write_image, tasks, chunksize=32) if pool else map(_write_image, tasks)
        for _ in tqdm(done, total=len(tasks), desc="phantoms", unit="img", disable=None):
            pass


def _write_image(task: tuple[Path, int, int, str, int, int]) -> None:
    path, patient, index, findings, seed, size = task
    pixels = render(multi_hot(findings).astype(bool), seed, patient, index, size)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _sample_rows(n: int, rng: np.random.Generator) -> list[tuple]:
    """Rows of the label table: patients with a geometric number (mean ~3, at most 10) of follow-ups.

    NIH's tail is far longer (up to 184 images), but one such patient would dominate a small split.
    """
    rows: list[tuple] = []
    patient = 0
    while len(rows) < n:
        patient += 1
        findings = _patient_findings(rng)
        age = int(np.clip(rng.normal(47, 16), 2, 90))
        gender = "M" if rng.random() < 0.56 else "F"
        (width, height), spacing = _FORMATS[rng.integers(len(_FORMATS))]
        for follow_up in range(min(rng.geometric(1 / 3), _MAX_FOLLOW_UPS, n - len(rows))):
            labels = [name for name in findings if rng.random() < _PERSIST]
            if rng.random() < _P_TRANSIENT:
                labels.append(_draw_weighted(rng, exclude=labels))
            shown = "|".join(name for name in LABELS if name in labels) or NO_FINDING
            view = "AP" if rng.random() < 0.4 else "PA"
            name = f"{patient:08d}_{follow_up:03d}.png"
            rows.append((name, shown, follow_up, patient, age + follow_up // 3, gender, view,
                         width, height, spacing, spacing))  # fmt: skip
    return rows


def _patient_findings(rng: np.random.Generator) -> list[str]:
    if rng.random() >= _P_SICK:
        return []
    findings = [_draw_weighted(rng, exclude=[])]
    if rng.random() < _P_SECOND_PRIMARY:
        findings.append(_draw_weighted(rng, exclude=findings))
    for primary in list(findings):
        for other, p in _COMORBID.get(primary, {}).items():
            if other not in findings and rng.random() < p:
                findings.append(other)
    return findings


def _draw_weighted(rng: np.random.Generator, exclude: list[str]) -> str:
    names = [name for name in _WEIGHT if name not in exclude]
    weights = np.array([_WEIGHT[name] for name in names])
    return names[rng.choice(len(names), p=weights / weights.sum())]
