"""Does Grad-CAM point at the lesion? Heatmaps scored against NIH's radiologist bounding boxes.

NIH ships 984 boxes for 8 findings (`BBox_List_2017.csv`: `Image Index, Finding Label, Bbox [x,y,w,h]`;
"Infiltrate" there is our "Infiltration"). Their coordinates are pixels of NIH's 1024 x 1024 PNGs (the
largest right edge in the file is 1012, the largest bottom edge 1022), not of the original scans whose
sizes the table lists as `OriginalImage[Width,Height]` (2,000 - 3,000 px, resized by NIH to 1024).

Mapping: every resize between the PNG and the model input (the cache's squash to a square, then the
resize to the input side) scales the whole field of view, with pixel edges at integer coordinates, so
a box [x, x + w] x [y, y + h] in source pixels becomes [x s_x, (x + w) s_x] x [y s_y, (y + h) s_y] with
s_x = input / source width, s_y = input / source height (source 1024 x 1024 by default).

Per box, for the heatmap of the box's finding:
- pointing game: a hit when the centre of the heatmap's hottest pixel lies inside the box;
- mass inside: the share of the heatmap's total inside the box (pixels weighted by their overlap);
- chance: the box's share of the image area: what a uniformly random point would hit, and the mass
  share of a flat heatmap. A heatmap with no support (all equal) is a pointing miss and has the
  chance mass share.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cxrfusion.atomic import atomic_path
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.report import Section
from cxrfusion.labels import LABEL_INDEX
from cxrfusion.tables import read_csv

log = logging.getLogger(__name__)

BOX_FILE = "BBox_List_2017.csv"
SOURCE_SIZE = (1024, 1024)  # width, height of NIH's PNGs, the space of the box coordinates
FINDING_ALIASES = {"Infiltrate": "Infiltration"}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in model-input pixels, edges at integers


def read_boxes(path: Path) -> pd.DataFrame:
    """The box file as `Image Index`, `finding` (one of our labels), `x`, `y`, `w`, `h`.

    Raises:
        CxrError: unreadable file, too few columns, a non-numeric coordinate or an unknown finding.
    """
    path = Path(path)
    raw = read_csv(path, "the NIH bounding boxes")
    if raw.shape[1] < 6 or list(raw.columns[:2]) != ["Image Index", "Finding Label"]:
        raise CxrError(f"{path}: expected columns Image Index, Finding Label, Bbox [x,y,w,h]")
    boxes = pd.DataFrame(
        {
            "Image Index": raw["Image Index"].astype(str),
            "finding": raw["Finding Label"].astype(str).str.strip().replace(FINDING_ALIASES),
        }
    )
    coordinates = raw.iloc[:, 2:6].apply(pd.to_numeric, errors="coerce")
    if coordinates.isna().any().any():
        row = int(np.flatnonzero(coordinates.isna().any(axis=1).to_numpy())[0])
        raise CxrError(f"{path}: line {row + 2}: box coordinates are not four numbers")
    boxes[["x", "y", "w", "h"]] = coordinates.to_numpy()
    unknown = sorted(set(boxes["finding"]) - set(LABEL_INDEX))
    if unknown:
        raise CxrError(f"{path}: unknown finding {unknown[0]!r}")
    return boxes


def map_box(box: Sequence[float], size: int, source: tuple[int, int] = SOURCE_SIZE) -> Box:
    """(x, y, w, h) in source pixels -> (x0, y0, x1, y1) in a size x size model input."""
    x, y, w, h = box
    sx, sy = size / source[0], size / source[1]
    return (x * sx, y * sy, (x + w) * sx, (y + h) * sy)


def _overlap(low: float, high: float, n: int) -> np.ndarray:
    """Length of [low, high] inside each unit pixel [i, i + 1], i < n."""
    edges = np.arange(n)
    return np.clip(np.minimum(edges + 1, high) - np.maximum(edges, low), 0.0, 1.0)


def box_coverage(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) share of each pixel covered by the box."""
    x0, y0, x1, y1 = box
    return np.outer(_overlap(y0, y1, shape[0]), _overlap(x0, x1, shape[1]))


def pointing_hit(heatmap: np.ndarray, box: Box) -> bool:
    """Whether the centre of the heatmap's hottest pixel lies in the box (no support: a miss)."""
    if heatmap.max() == heatmap.min():
        return False
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x0, y0, x1, y1 = box
    return bool(x0 <= column + 0.5 <= x1 and y0 <= row + 0.5 <= y1)


def mass_inside(heatmap: np.ndarray, box: Box) -> float:
    """Share of the heatmap's total inside the box; a flat heatmap gives the box's area share."""
    coverage = box_coverage(box, heatmap.shape)
    heat = np.clip(np.asarray(heatmap, dtype=float), 0.0, None)
    if heat.max() == heat.min():
        return float(coverage.mean())
    return float((heat * coverage).sum() / heat.sum())


def chance_share(box: Sequence[float], source: tuple[int, int] = SOURCE_SIZE) -> float:
    """The box's share of the image area (clipped to the image)."""
    x, y, w, h = box
    width = min(x + w, source[0]) - max(x, 0.0)
    height = min(y + h, source[1]) - max(y, 0.0)
    return max(width, 0.0) * max(height, 0.0) / (source[0] * source[1])


def _evaluated(boxes: pd.DataFrame, position: dict[str, int]) -> pd.DataFrame:
    """The boxes of evaluated images, with `Image Index` renamed `image` (for itertuples)."""
    kept = boxes[boxes["Image Index"].isin(position)].reset_index(drop=True)
    return kept.rename(columns={"Image Index": "image"})


def localisation_metrics(
    boxes: pd.DataFrame,
    image_names: Sequence[str],
    heatmap: Callable[[int, int], np.ndarray],
    size: int,
    source: Path | str,
) -> dict:
    """Pointing game, mass inside and chance per finding, over the boxes of the evaluated images.

    Args:
        boxes: `read_boxes` output.
        image_names: the evaluated images, in dataset order.
        heatmap: (position in `image_names`, class index) -> (size, size) heatmap; called once per
            image and finding.
        size: side of the model input.
        source: the box file (recorded).

    Raises:
        CxrError: when no evaluated image has a box.
    """
    position = {name: i for i, name in enumerate(image_names)}
    boxes = _evaluated(boxes, position)
    if boxes.empty:
        raise CxrError(f"{source}: none of the {len(position):,} evaluated images has a box")
    records = []
    for (image, finding), part in boxes.groupby(["image", "finding"], sort=False):
        heat = heatmap(position[image], LABEL_INDEX[finding])
        for row in part.itertuples(index=False):
            mapped = map_box((row.x, row.y, row.w, row.h), size)
            records.append(
                {
                    "finding": finding,
                    "image": image,
                    "hit": pointing_hit(heat, mapped),
                    "mass": mass_inside(heat, mapped),
                    "chance": chance_share((row.x, row.y, row.w, row.h)),
                    "flat": bool(heat.max() == heat.min()),
                }
            )
    table = pd.DataFrame(records)
    findings = {name: _summary(part) for name, part in table.groupby("finding", sort=True)}
    log.info("localisation: %d boxes on %d images", len(table), table["image"].nunique())
    return {
        "source": str(source),
        "source_size": list(SOURCE_SIZE),
        "input_size": size,
        "n_boxes": len(table),
        "n_images": int(table["image"].nunique()),
        "findings": findings,
        "overall": _summary(table),
    }


def _summary(part: pd.DataFrame) -> dict:
    return {
        "boxes": len(part),
        "images": int(part["image"].nunique()),
        "hits": int(part["hit"].sum()),
        "pointing": float(part["hit"].mean()),
        "mass_inside": float(part["mass"].mean()),
        "chance": float(part["chance"].mean()),
        "no_support": int(part["flat"].sum()),
    }


def localisation_table(metrics: dict) -> pd.DataFrame:
    """One row per finding (then All): boxes, images, hits, pointing accuracy, mass, chance."""
    rows = {**metrics["findings"], "All": metrics["overall"]}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table.rename(
        columns={
            "pointing": "pointing game",
            "mass_inside": "mass inside box",
            "no_support": "flat heatmaps",
        }
    )
    table.index.name = "finding"
    return table


def localisation_section(metrics: dict, figure: Path | None) -> Section:
    """The report's section on localisation."""
    return Section(
        "Localisation (NIH boxes)",
        text=f"Grad-CAM of each box's finding on {metrics['n_images']:,} evaluated images with "
        f"{metrics['n_boxes']:,} radiologist boxes ({metrics['source']}). Pointing game: the "
        "hottest pixel lies in the box. Mass inside box: the heatmap's share inside it. Chance: "
        "the box's share of the image, what a random point or a flat heatmap scores (a flat "
        "heatmap, where Grad-CAM finds no support, is a pointing miss). Box "
        f"coordinates are pixels of NIH's {SOURCE_SIZE[0]} px PNGs, scaled by input / "
        f"{SOURCE_SIZE[0]} to the {metrics['input_size']} px model input.",
        table=localisation_table(metrics),
        figure=figure,
        caption="Grad-CAM of the boxed finding with NIH's box (white)." if figure else "",
    )


def gradcam_heatmap_fn(model, dataset) -> Callable[[int, int], np.ndarray]:
    """(position, class) -> the Grad-CAM heatmap of that dataset image (memoised: the metrics and
    the figure ask for the same ones)."""
    from cxrfusion.evaluation.predictions import model_input
    from cxrfusion.explain import gradcam

    @functools.cache
    def heatmap(position: int, class_index: int) -> np.ndarray:
        image, _, _ = dataset[position]
        return gradcam(model, model_input(model, image.unsqueeze(0)), class_index)

    return heatmap


def plot_boxes(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    boxes: Sequence[Box],
    titles: Sequence[str],
    path: Path,
) -> Path:
    """Radiographs with their heatmap (jet, translucent) and box, one panel each; atomic PNG."""
    figure = Figure(figsize=(3.2 * len(images), 3.6))
    axes = figure.subplots(1, len(images), squeeze=False)[0]
    for ax, image, heat, box, title in zip(axes, images, heatmaps, boxes, titles, strict=True):
        side = image.shape[0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, side, side, 0))
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1, extent=(0, side, side, 0))
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def box_figure(
    boxes: pd.DataFrame,
    image_names: Sequence[str],
    dataset,
    heatmap: Callable[[int, int], np.ndarray],
    size: int,
    path: Path,
    count: int = 4,
) -> Path | None:
    """Up to `count` evaluated images with their first box and its heatmap, one per finding
    first (in file order), preferring heatmaps with support (a flat one shows nothing)."""
    position = {name: i for i, name in enumerate(image_names)}
    candidates = _evaluated(boxes, position).drop_duplicates("image")
    if candidates.empty:
        return None
    ranked = []
    for row in candidates.itertuples(index=False):
        heat = heatmap(position[row.image], LABEL_INDEX[row.finding])
        ranked.append((heat.max() == heat.min(), row, heat))
    first_of_finding = {}
    for flat, row, heat in sorted(ranked, key=lambda item: item[0]):
        first_of_finding.setdefault(row.finding, (flat, row, heat))
    chosen = sorted(first_of_finding.values(), key=lambda item: item[0])[:count]
    images, heats, mapped, titles = [], [], [], []
    for _, row, heat in chosen:
        image, _, _ = dataset[position[row.image]]
        images.append(image[0].numpy())
        heats.append(heat)
        mapped.append(map_box((row.x, row.y, row.w, row.h), size))
        titles.append(f"{row.image}\n{row.finding}")
    return plot_boxes(images, heats, mapped, titles, path)
