"""`cxrfusion predict`: files, folders and globs in; predictions.csv, predictions.json and overlays out.

A file that cannot be decoded is recorded with its reason and skipped; the others go on. Outputs are
written atomically once every image has been seen.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cxrfusion.atomic import write_atomic
from cxrfusion.data.imageio import IMAGE_SUFFIXES
from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import Classifier, Predictions, PreparedImage
from cxrfusion.tables import to_csv

log = logging.getLogger(__name__)
_GLOB_CHARS = frozenset("*?[")


@dataclass
class PredictResult:
    """What `predict_files` did.

    Attributes:
        predictions: one per readable file, in input order.
        failures: (file, reason) for each file that could not be predicted.
        files: the output files written.
    """

    predictions: Predictions
    failures: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively: PNG/JPEG/DICOM by suffix) and globs, in order.

    Returns:
        The image files (each once), and (input, reason) for inputs that match nothing.
    """
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        text = str(item)
        matches = sorted(glob.glob(text, recursive=True)) if _GLOB_CHARS & set(text) else [text]
        paths = [Path(m) for m in matches if Path(m).exists()]
        if not paths:
            missing.append((text, f"{text}: no such file or folder"))
        for path in paths:
            found.extend(_folder_images(path) if path.is_dir() else [path])
    return list(dict.fromkeys(found)), missing


def _folder_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def predict_files(
    classifier: Classifier,
    inputs: Sequence[str | Path],
    out: Path,
    batch_size: int = 32,
    gradcam: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Predict every image among `inputs` and write the results into `out`.

    Writes `predictions.csv` (`Predictions.to_frame`), `predictions.json` (the model card's
    essentials, its conformal calibration when there is one, each prediction's `to_dict`, and the
    failures) and, with `gradcam`,
    `gradcam/<n>_<name>.png` (the image and the heatmaps of its 3 most probable findings; a long
    name is shortened by `explain.figure_name`).

    Args:
        classifier: the loaded model.
        inputs: files, folders and glob patterns.
        out: output folder (created).
        batch_size: images per forward pass.
        gradcam: also explain each image with Grad-CAM (torch engine).
        progress: show a progress bar.

    Raises:
        CxrError: no input names an image, or no image could be predicted.
    """
    if batch_size < 1:
        raise CxrError(f"--batch-size must be >= 1, got {batch_size}")
    files, failures = find_images(inputs)
    if not files:
        reason = failures[0][1] if failures else "no PNG/JPEG/DICOM file in the inputs"
        raise CxrError(f"nothing to predict: {reason}")
    result = PredictResult(Predictions(), failures)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None if progress else True)
    batches = _prepared_batches(classifier, files, batch_size, result.failures)
    for index, batch in enumerate(batches):
        seed = classifier.seed + index  # as Classifier.predict_many and evaluate
        result.predictions.extend(classifier.predict_prepared(batch, seed, gradcam))
        bar.update(len(batch))
    bar.close()
    if not result.predictions:
        raise CxrError(f"none of the {len(files)} image(s) could be read, first {failures[0][1]}")
    result.files = _write(out, classifier, result, gradcam)
    return result


def _prepared_batches(
    classifier: Classifier, files: list[Path], size: int, failures: list[tuple[str, str]]
) -> Iterator[list[PreparedImage]]:
    """Batches of decoded images; a file that fails is added to `failures` and skipped."""
    batch: list[PreparedImage] = []
    for path in files:
        try:
            batch.append(classifier.prepare(path))
        except CxrError as error:
            failures.append((str(path), str(error)))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(out: Path, classifier: Classifier, result: PredictResult, gradcam: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = result.predictions.to_frame()
    card = classifier.card()
    document = {
        "model": {key: card[key] for key in ("architecture", "threshold", "mc_samples")},
        "temperatures": card["temperatures"],
        **({"conformal": card["conformal"]} if "conformal" in card else {}),
        "predictions": [p.to_dict() for p in result.predictions],
        "failed": [{"source": source, "error": reason} for source, reason in result.failures],
    }
    files = [
        write_atomic(out / "predictions.csv", to_csv(table)),
        write_atomic(out / "predictions.json", json.dumps(document, indent=2, allow_nan=False)),
    ]
    if gradcam:
        from cxrfusion.explain import figure_name, save_gradcam_figure

        for index, p in enumerate(result.predictions):
            probs = {label: float(p.probability[p.labels.index(label)]) for label in p.heatmaps}
            name = figure_name(f"{index:05d}", p.source)
            files.append(save_gradcam_figure(p.image, p.heatmaps, probs, out / "gradcam" / name))
    log.info("predictions of %d image(s) written to %s", len(result.predictions), out)
    return files
