"""Localisation against NIH's boxes: the box mapping, pointing game, mass inside and chance."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrfusion.data.imageio import resize_square
from cxrfusion.data.transforms import resize
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.localisation import (
    box_coverage,
    chance_share,
    localisation_metrics,
    map_box,
    mass_inside,
    plot_boxes,
    pointing_hit,
    read_boxes,
)
from cxrfusion.labels import LABEL_INDEX

META = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-meta"
BOX = (225.08, 547.02, 86.78, 79.19)  # the first Atelectasis box of BBox_List_2017.csv


def _peak(x: float, y: float, side: int = 1024, sigma: float = 12.0) -> np.ndarray:
    """A uint8 heatmap in original 1024 px coordinates peaked at (x, y)."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    heat = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.round(255 * heat).astype(np.uint8)


def _as_model_input(heat: np.ndarray, cache: int, size: int) -> np.ndarray:
    """The same two resizes an image goes through: cache (Pillow) then model input (OpenCV)."""
    return resize(resize_square(heat, cache)[None], size)[0].astype(float)


@pytest.mark.parametrize(("cache", "size"), [(256, 256), (256, 224)])
def test_heatmap_peaked_at_the_box_centre_hits_the_mapped_box(cache: int, size: int) -> None:
    x, y, w, h = BOX
    heat = _as_model_input(_peak(x + w / 2, y + h / 2), cache, size)
    assert pointing_hit(heat, map_box(BOX, size))


@pytest.mark.parametrize(("cache", "size"), [(256, 256), (256, 224)])
def test_heatmap_peaked_just_outside_the_box_misses_it(cache: int, size: int) -> None:
    x, y, w, h = BOX
    for px, py in [(x - 20, y + h / 2), (x + w + 20, y + h / 2), (x + w / 2, y - 20)]:
        heat = _as_model_input(_peak(px, py), cache, size)
        assert not pointing_hit(heat, map_box(BOX, size)), (px, py)


def test_map_box_scales_by_input_over_source() -> None:
    assert map_box((100, 200, 300, 400), 256) == (25.0, 50.0, 100.0, 150.0)
    assert map_box((100, 200, 300, 400), 224, source=(2048, 1024)) == pytest.approx(
        (10.9375, 43.75, 43.75, 131.25)
    )


def test_a_flat_heatmap_scores_chance_and_misses_the_pointing_game() -> None:
    box = map_box(BOX, 64)
    flat = np.ones((64, 64))
    assert mass_inside(flat, box) == pytest.approx(chance_share(BOX), rel=1e-9)
    assert chance_share(BOX) == pytest.approx(BOX[2] * BOX[3] / 1024**2)
    assert not pointing_hit(flat, box)


def test_mass_inside_is_one_for_heat_confined_to_the_box_and_zero_outside() -> None:
    box = (8.0, 8.0, 24.0, 24.0)
    inside = box_coverage(box, (64, 64))
    assert mass_inside(inside, box) == pytest.approx(1.0)
    assert mass_inside(1.0 - inside, box) == pytest.approx(0.0)


def test_chance_share_clips_a_box_that_leaves_the_image() -> None:
    assert chance_share((1000, 0, 100, 1024)) == pytest.approx(24 / 1024)


def test_metrics_count_boxes_per_finding_and_call_each_heatmap_once(tmp_path: Path) -> None:
    boxes = pd.DataFrame(
        {
            "Image Index": ["a.png", "a.png", "b.png", "c.png"],
            "finding": ["Mass", "Mass", "Nodule", "Mass"],
            "x": [0.0, 512.0, 0.0, 0.0],
            "y": [0.0, 512.0, 0.0, 0.0],
            "w": [512.0, 512.0, 1024.0, 10.0],
            "h": [512.0, 512.0, 1024.0, 10.0],
        }
    )
    calls = []

    def heatmap(position: int, class_index: int) -> np.ndarray:
        calls.append((position, class_index))
        heat = np.zeros((32, 32))
        heat[4, 4] = 1.0  # top-left quadrant
        return heat

    found = localisation_metrics(boxes, ["b.png", "a.png"], heatmap, 32, tmp_path / "boxes.csv")
    assert sorted(calls) == [(0, LABEL_INDEX["Nodule"]), (1, LABEL_INDEX["Mass"])]
    assert found["n_boxes"] == 3 and found["n_images"] == 2  # c.png is not evaluated
    mass = found["findings"]["Mass"]
    assert (mass["boxes"], mass["images"], mass["hits"]) == (2, 1, 1)
    assert mass["chance"] == pytest.approx(0.25)
    assert mass["mass_inside"] == pytest.approx(0.5)
    assert found["findings"]["Nodule"]["pointing"] == 1.0


def test_metrics_refuse_when_no_evaluated_image_has_a_box(tmp_path: Path) -> None:
    boxes = pd.DataFrame(
        {
            "Image Index": ["x.png"],
            "finding": ["Mass"],
            "x": [0.0],
            "y": [0.0],
            "w": [1.0],
            "h": [1.0],
        }
    )
    with pytest.raises(CxrError, match="none of the 1 evaluated images has a box"):
        localisation_metrics(boxes, ["a.png"], lambda p, c: np.zeros((8, 8)), 8, "boxes.csv")


@pytest.mark.skipif(not META.exists(), reason="needs ../shared/data/nih14-meta")
def test_reads_nih_box_file_with_its_trailing_columns_and_infiltrate_alias() -> None:
    boxes = read_boxes(META / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984
    assert set(boxes["finding"]) == {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    assert ((boxes["x"] + boxes["w"]) <= 1024).all() and ((boxes["y"] + boxes["h"]) <= 1024).all()


def test_box_file_with_an_unknown_finding_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Fracture,1,2,3,4\n")
    with pytest.raises(CxrError, match="unknown finding 'Fracture'"):
        read_boxes(path)


def test_box_figure_is_a_png(tmp_path: Path) -> None:
    image = np.full((32, 32), 128, dtype=np.uint8)
    path = plot_boxes(
        [image], [np.eye(32)], [(4.0, 4.0, 20.0, 20.0)], ["a.png"], tmp_path / "b.png"
    )
    assert path.read_bytes().startswith(b"\x89PNG")
