"""Synthetic chest radiograph phantoms in the NIH ChestX-ray14 layout: the built-in demo and test data.

No real X-ray may be committed, so `synthesize` writes a label table and PNGs that look like NIH's:
a body, two lung fields with vascular markings, heart, ribs, clavicles, spine and trachea, varied in
anatomy, pose, exposure and noise, plus one visible sign per pathology (see `_SIGNS`, drawn at
`_CONSPICUITY` times its natural contrast). Each patient keeps their anatomy, findings and lesion
sites across follow-ups, so image-wise splits leak.

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
import math
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxrfusion.atomic import atomic_path
from cxrfusion.errors import CxrError
from cxrfusion.labels import LABEL_INDEX, LABELS, NO_FINDING, multi_hot

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

# Seed-sequence streams: a patient's anatomy and lesions, an image's pose and noise, the table.
_PATIENT, _IMAGE, _TABLE = 0, 1, 2

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
# Every sign's change to the healthy chest is drawn this many times stronger than its anatomy alone
# would make it. Drawn 1:1, a 64 px nodule is ~10 of 4,096 pixels and the report's CNN (no
# normalisation layer) was still below 0.8 validation macro AUC after 12 CPU epochs; at 2.5x it
# passes 0.9 in 12 (tests/test_training.py), so demos and tests show learning in CPU minutes.
_CONSPICUITY = 2.5
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
    for name, value, least in (
        ("n", n, 1),
        ("seed", seed, 0),
        ("size", size, 32),
        ("workers", workers, 1),
    ):
        if value < least:
            raise CxrError(f"{out}: synthetic data needs {name} >= {least}, got {value}")
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / TABLE_NAME).unlink(missing_ok=True)
    rows = _sample_rows(n, _stream(seed, _TABLE))
    tasks = [(images / row[0], row[3], i, row[1], seed, size) for i, row in enumerate(rows)]
    _write_images(tasks, workers)
    with atomic_path(out / TABLE_NAME) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    log.info("wrote %d synthetic images of %d px to %s", n, size, out)
    return out


def render_phantom(findings: Collection[str], seed: int, size: int = 256) -> np.ndarray:
    """One phantom with the given findings, as a (size, size) uint8 array.

    Args:
        findings: label names from `LABELS` (empty for a normal chest).
        seed: picks the patient's anatomy, the lesion sites and the image's pose and noise.
        size: side in pixels.

    Raises:
        ValueError: for a name that is not one of the 14 labels.
    """
    active = multi_hot("|".join(findings) or NO_FINDING).astype(bool)
    return _render(active, seed, 0, 0, size)


def _write_images(tasks: list[tuple], workers: int) -> None:
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        done = pool.map(_write_image, tasks, chunksize=32) if pool else map(_write_image, tasks)
        for _ in tqdm(done, total=len(tasks), desc="phantoms", unit="img"):
            pass


def _write_image(task: tuple[Path, int, int, str, int, int]) -> None:
    path, patient, index, findings, seed, size = task
    pixels = _render(multi_hot(findings).astype(bool), seed, patient, index, size)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


# ---------------------------------------------------------------- the table


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


# ---------------------------------------------------------------- the picture
# Body coordinates: x to the image's right, y down, the chest spanning about -1..1. Attenuation `att`
# runs from ~0.1 (air) to ~0.8 (bone) and is bright on the radiograph, as on a real one. Everything
# stays float32 (scalars as Python floats) because float64 doubles the cost of every array step.

_TISSUE = 0.36  # how much darker aerated lung is than soft tissue
_HILUM = (0.17, -0.02)  # |x| and y of the hila, where vessels and bronchi fan out from


@dataclass(frozen=True)
class _Anatomy:
    """One patient's chest; index 0 of a pair is the image-left lung (the patient's right)."""

    body: float  # half-width of the thorax
    lung_x: float  # distance of each lung's centre from the midline
    lung_w: float  # half-width of a lung at its base
    apex: float  # y of the lung apices
    base: tuple[float, float]  # y of the costophrenic angles
    dome: float  # height of the diaphragm domes above the angles
    heart: tuple[float, float, float, float]  # centre x, centre y, half-width, half-height
    rib_gap: float  # vertical spacing of the ribs
    rib_phase: float  # radians
    bubble: float  # radius of the gastric air bubble under the left dome (0: none)


@dataclass
class _Scene:
    x: np.ndarray
    y: np.ndarray
    anatomy: _Anatomy
    att: np.ndarray
    lungs: dict[int, np.ndarray]  # side (-1 image left, +1 image right) -> soft mask, heart removed
    markings: np.ndarray  # the vascular markings already added to `att`

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def lung_coords(self, side: int, anatomy: _Anatomy | None = None) -> tuple[np.ndarray, ...]:
        """Lateral coordinate u (0 at the lung's axis, 1 at its rim) and radius r (1 at the pleura)."""
        a = anatomy or self.anatomy
        base = a.base[side > 0]
        u = (side * self.x - a.lung_x) * (1 / a.lung_w)
        v = np.minimum(self.y - base, 0) * (1 / (base - a.apex))
        v *= v
        return u, np.sqrt(u * u + v * (0.55 + 0.45 * v))  # a blunt apex, a convex lateral wall

    def reshape(self, anatomy: _Anatomy) -> None:
        """Move the heart, lungs or diaphragm: what turns from lung to tissue brightens, and back."""
        old = sum(self.lungs.values())
        self.anatomy = anatomy
        self.lungs = _lung_masks(self)
        self.att -= _TISSUE * (sum(self.lungs.values()) - old)


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _render(active: np.ndarray, seed: int, patient: int, index: int, size: int) -> np.ndarray:
    """Pixels of one image: the patient fixes anatomy and lesion sites, the image pose and noise."""
    rng = _stream(seed, _IMAGE, index, 0)
    scene = _draw_chest(_anatomy(_stream(seed, _PATIENT, patient, 0)), rng, size)
    healthy = scene.att.copy()
    for name, sign in _SIGNS.items():
        key = LABEL_INDEX[name] + 1  # each sign its own streams: adding one changes nothing else
        if active[key - 1]:
            sign(scene, _stream(seed, _PATIENT, patient, key), _stream(seed, _IMAGE, index, key))
    scene.att = healthy + _CONSPICUITY * (scene.att - healthy)
    return _expose(scene.att, rng)


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    lung_x, lung_w, base = rng.uniform(0.44, 0.48), rng.uniform(0.29, 0.34), rng.uniform(0.5, 0.6)
    return _Anatomy(
        body=lung_x + lung_w + rng.uniform(0.06, 0.12),
        lung_x=lung_x,
        lung_w=lung_w,
        apex=rng.uniform(-0.8, -0.7),
        base=(base - rng.uniform(0.0, 0.06), base),
        dome=rng.uniform(0.12, 0.2),
        heart=(
            rng.uniform(0.12, 0.17),
            rng.uniform(0.33, 0.38),
            rng.uniform(0.3, 0.34),
            rng.uniform(0.21, 0.25),
        ),
        rib_gap=rng.uniform(0.15, 0.19),
        rib_phase=rng.uniform(0, 2 * math.pi),
        bubble=rng.uniform(0.04, 0.08) if rng.random() < 0.6 else 0.0,
    )


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ticks = (np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1
    return tuple(np.meshgrid(ticks, ticks))


@lru_cache(maxsize=4)
def _hilar_angle(size: int) -> dict[int, np.ndarray]:
    """Angle of each pixel around each hilum, for vessels and bronchi (arctan2 is costly)."""
    gx, gy = _grid(size)
    return {side: np.arctan2(gy - _HILUM[1], side * gx - _HILUM[0]) for side in (-1, 1)}


def _pose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates of each pixel under a small random rotation, zoom and shift."""
    gx, gy = _grid(size)
    angle = float(np.clip(rng.normal(0, 0.04), -0.09, 0.09))
    zoom = rng.uniform(0.93, 1.06)
    tx, ty = rng.normal(0, 0.03), rng.normal(0, 0.03)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    return cos * (gx - tx) + sin * (gy - ty), cos * (gy - ty) - sin * (gx - tx)


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft step: 1 where `distance` > 0 (inside), 0 outside, a linear ramp `edge` wide."""
    return np.clip(distance * (1 / edge) + 0.5, 0, 1)


def _peaks(phase: np.ndarray, squarings: int) -> np.ndarray:
    """Narrow periodic ridges: ((1 + cos) / 2) ** (2 ** squarings), by squaring (fast)."""
    ridge = 0.5 + 0.5 * np.cos(phase)
    for _ in range(squarings):
        ridge *= ridge
    return ridge


def _ellipse(
    scene: _Scene, cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0
) -> np.ndarray:
    """Normalised radius around (cx, cy): 1 on the ellipse with half-axes rx, ry turned by `tilt`."""
    dx, dy = scene.x - cx, scene.y - cy
    cos, sin = math.cos(tilt), math.sin(tilt)
    return np.sqrt(((cos * dx + sin * dy) / rx) ** 2 + ((cos * dy - sin * dx) / ry) ** 2)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise (std ~0.7) with about `cells` features across the image."""
    coarse = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _lung_masks(scene: _Scene) -> dict[int, np.ndarray]:
    a = scene.anatomy
    hx, hy, hw, hh = a.heart
    heart = _inside(1 - _ellipse(scene, hx, hy, hw, hh, tilt=0.35), 0.06)
    # Below its widest part the heart rests on the diaphragm: no lung under it.
    seat = _inside(scene.y - hy - 0.3 * hh, 0.05) * _inside(0.8 * hw - np.abs(scene.x - hx), 0.06)
    heart = np.maximum(heart, seat)
    knob = _inside(1 - _ellipse(scene, 0.1, -0.33, 0.08, 0.07), 0.05)
    masks = {}
    for side in (-1, 1):
        u, r = scene.lung_coords(side)
        dome = a.base[side > 0] - a.dome * np.cos(np.clip(u, -1, 1) * (math.pi / 2))
        masks[side] = _inside(1 - r, 0.05) * _inside(dome - scene.y, 0.02) * (1 - heart - knob)
    return masks


def _draw_chest(a: _Anatomy, rng: np.random.Generator, size: int) -> _Scene:
    x, y = _pose(rng, size)
    ax = np.abs(x)
    shoulder = np.clip((-0.75 - y) * (1 / 0.3), 0, 1)
    half = np.maximum(a.body * np.sqrt(1 - shoulder * shoulder), 0.28)
    body = _inside(half - ax, 0.04)
    thickness = np.sqrt(np.clip(1 - (x * (1 / (a.body + 0.04))) ** 2, 0, 1))
    att = 0.1 + body * (0.2 + 0.4 * thickness)
    scene = _Scene(x, y, a, att, {}, np.zeros_like(x))
    scene.lungs = _lung_masks(scene)
    lungs = sum(scene.lungs.values())
    att -= _TISSUE * lungs
    # Ribs: posterior arcs (rising from the spine, then falling laterally), fainter anterior ones,
    # both plainer against aerated lung than against soft tissue.
    cage = body * _inside(ax - 0.07, 0.02) * _inside(0.6 - y, 0.1) * (0.4 + 0.6 * lungs)
    wavenumber = 2 * math.pi / a.rib_gap
    posterior = (y + 0.25 * ax - 0.8 * x * x) * wavenumber + a.rib_phase
    anterior = (y + 0.55 * ax) * (wavenumber / 1.2) + a.rib_phase
    ribs = 0.09 * _peaks(posterior, 3) + 0.04 * _peaks(anterior, 3) * _inside(ax - 0.3, 0.1)
    att += cage * ribs
    clavicle = np.abs(y + 0.72 + 0.12 * (ax - 0.1)) - 0.035 * _inside(0.6 - ax, 0.05)
    att += 0.1 * _inside(-clavicle, 0.015) * _inside(ax - 0.06, 0.02)
    vertebrae = 0.8 + 0.2 * np.cos(y * (2 * math.pi / 0.1))
    att += 0.1 * _inside(0.065 - ax, 0.015) * vertebrae * body
    att -= 0.08 * _inside(0.03 - ax, 0.015) * _inside(-0.3 - y, 0.05)  # trachea
    if a.bubble:
        stomach = _ellipse(scene, a.lung_x, a.base[1] + 0.1 + a.bubble, 1.3 * a.bubble, a.bubble)
        att -= 0.12 * _inside(1 - stomach, 0.3)
    _add_markings(scene, rng)
    return scene


def _add_markings(scene: _Scene, rng: np.random.Generator) -> None:
    """Vessels fanning out from the hila, fading towards the periphery, plus fine texture."""
    warp = 2.5 * _noise(rng, scene.size, 6)
    grain = 0.015 * _noise(rng, scene.size, 24)
    for side, lung in scene.lungs.items():
        dx, dy = side * scene.x - _HILUM[0], scene.y - _HILUM[1]
        dist2 = dx * dx + dy * dy
        fan = _peaks(30 * _hilar_angle(scene.size)[side] + warp, 3)
        scene.markings += lung * (0.09 * fan * np.exp(np.sqrt(dist2) * (-1 / 0.35)) + grain)
        scene.att += 0.1 * np.exp(dist2 * (-1 / 0.006))  # hilum
    scene.att += scene.markings


def _expose(att: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure: contrast, brightness, a slow gradient, gamma and quantum noise, to uint8."""
    size = att.shape[0]
    image = att * rng.uniform(0.95, 1.2) + rng.uniform(-0.07, 0.05) + 0.04 * _noise(rng, size, 3)
    gamma = np.linspace(0, 1, 1024, dtype=np.float32) ** rng.uniform(0.8, 1.25)
    image = gamma[(np.clip(image, 0, 1) * 1023).astype(np.intp)]
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.005, 0.02)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- the signs
# Each sign draws its finding into the scene. `lesion` is the same generator state at every follow-up
# of a patient (side, site, size persist); `rng` varies per image. Signs that move anatomy come first.


def _side(lesion: np.random.Generator) -> int:
    return -1 if lesion.random() < 0.5 else 1


def _lung_point(
    a: _Anatomy, side: int, lesion: np.random.Generator, low: float, high: float
) -> tuple[float, float]:
    """A site in one lung, between fractions `low` and `high` of the way from apex to base."""
    depth = lesion.uniform(low, high)
    half = a.lung_w * math.sqrt(1 - (1 - depth) ** 2)
    x = side * (a.lung_x + half * lesion.uniform(-0.3, 0.65))
    return x, a.apex + depth * (a.base[side > 0] - a.apex)


def _atelectasis(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Volume loss (raised hemidiaphragm, heart pulled over) and a plate-like band of collapse."""
    a, side = scene.anatomy, _side(lesion)
    lift = lesion.uniform(0.05, 0.1)
    base = (a.base[0] - lift, a.base[1]) if side < 0 else (a.base[0], a.base[1] - lift)
    hx, hy, hw, hh = a.heart
    scene.reshape(replace(a, base=base, heart=(hx + 0.03 * side, hy, hw, hh)))
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.55, 0.85)
    length, width = lesion.uniform(0.15, 0.25), lesion.uniform(0.03, 0.05)
    band = _ellipse(scene, cx, cy, length, width, tilt=lesion.uniform(-0.35, 0.35))
    scene.att += lesion.uniform(0.2, 0.3) * _inside(1 - band, 0.3) * scene.lungs[side]


def _cardiomegaly(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """An enlarged heart, mostly to the patient's left: cardiothoracic ratio above one half."""
    hx, hy, hw, hh = scene.anatomy.heart
    wider, taller = lesion.uniform(1.25, 1.55), lesion.uniform(1.05, 1.2)
    heart = (hx + 0.4 * (wider - 1) * hw, hy + 0.5 * (taller - 1) * hh, wider * hw, taller * hh)
    scene.reshape(replace(scene.anatomy, heart=heart))


def _emphysema(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Hyperinflated, hyperlucent lungs with flat diaphragms and sparse markings."""
    a = scene.anatomy
    drop = lesion.uniform(0.06, 0.12)
    scene.reshape(replace(a, lung_w=a.lung_w * 1.08, apex=a.apex - 0.04, dome=a.dome * 0.3,
                          base=(a.base[0] + drop, a.base[1] + drop)))  # fmt: skip
    lungs = sum(scene.lungs.values())
    scene.att -= lungs * (lesion.uniform(0.04, 0.08) + 0.6 * scene.markings)


def _consolidation(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A dense, fairly homogeneous patch, sometimes cut flat by a fissure."""
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.2, 0.7)
    rx, ry = lesion.uniform(0.12, 0.2), lesion.uniform(0.1, 0.16)
    ragged = 0.3 * _noise(lesion, scene.size, 12)
    patch = _inside(1 - _ellipse(scene, cx, cy, rx, ry) + ragged, 0.1)
    if lesion.random() < 0.5:
        patch *= _inside(scene.y - cy + 0.3 * ry, 0.01)
    scene.att += lesion.uniform(0.25, 0.35) * rng.uniform(0.85, 1.1) * patch * scene.lungs[side]


def _edema(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Bilateral perihilar 'bat-wing' haze."""
    spread, level = lesion.uniform(0.2, 0.3), lesion.uniform(0.13, 0.2) * rng.uniform(0.85, 1.1)
    texture = 1 + 0.3 * _noise(rng, scene.size, 10)
    for side, lung in scene.lungs.items():
        wing = np.exp(-(((side * scene.x - 0.2) / spread) ** 2) - (scene.y * (1 / 0.35)) ** 2)
        scene.att += level * wing * texture * lung


def _effusion(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Fluid at a lung base (sometimes both) with a meniscus climbing the lateral wall."""
    sides = (-1, 1) if lesion.random() < 0.25 else (_side(lesion),)
    for side in sides:
        u, _ = scene.lung_coords(side)
        level = scene.anatomy.base[side > 0] - lesion.uniform(0.15, 0.35)
        meniscus = lesion.uniform(0.08, 0.2) * np.clip(u, 0, 1) ** 2
        fluid = _inside(scene.y - level + meniscus, 0.02)
        scene.att += 0.9 * _TISSUE * fluid * scene.lungs[side]


def _fibrosis(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A reticular net of fine lines, peripheral and basal, in both lungs."""
    strands = (_noise(lesion, scene.size, 32) * (1 / 0.15) for _ in range(2))
    net = np.maximum(*(np.exp(-(s * s)) for s in strands))
    level = lesion.uniform(0.16, 0.24) * rng.uniform(0.85, 1.1)
    for side, lung in scene.lungs.items():
        _, r = scene.lung_coords(side)
        periphery = np.clip((r - 0.5) * (1 / 0.35), 0, 1) * _inside(scene.y + 0.2, 0.4)
        scene.att += level * net * periphery * lung


def _hernia(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A round gas lucency with a thin wall and an air-fluid level, behind the heart."""
    hx, hy, _, _ = scene.anatomy.heart
    radius = lesion.uniform(0.07, 0.12)
    cx, cy = hx + lesion.uniform(-0.08, 0.05), hy + lesion.uniform(0.0, 0.08)
    r = _ellipse(scene, cx, cy, radius, radius * 0.85)
    gas = _inside(1 - r, 0.15) * _inside(cy + 0.4 * radius - scene.y, 0.01)
    scene.att += 0.07 * np.exp(-(((r - 1) * (1 / 0.12)) ** 2)) - 0.25 * gas


def _infiltration(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Diffuse, hazy, reticular opacity over a large part of one or both lungs."""
    sides = (-1, 1) if lesion.random() < 0.4 else (_side(lesion),)
    level = lesion.uniform(0.1, 0.16) * rng.uniform(0.85, 1.1)
    texture = np.clip(0.6 + _noise(rng, scene.size, 14), 0, None)
    for side in sides:
        cx, cy = _lung_point(scene.anatomy, side, lesion, 0.3, 0.8)
        region = _inside(1 - _ellipse(scene, cx, cy, 0.3, lesion.uniform(0.25, 0.4)), 0.4)
        scene.att += level * region * texture * scene.lungs[side]


def _round_opacity(scene: _Scene, lesion: np.random.Generator, radius: float, level: float) -> None:
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.15, 0.8)
    r = _ellipse(scene, cx, cy, radius, radius * lesion.uniform(0.85, 1.1))
    scene.att += level * _inside(1 - r, 0.25) * scene.lungs[side]


def _mass(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A large round opacity (over 3 cm)."""
    _round_opacity(scene, lesion, lesion.uniform(0.09, 0.15), lesion.uniform(0.28, 0.38))


def _nodule(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """One or two small, dense, round opacities."""
    for _ in range(1 + (lesion.random() < 0.5)):
        _round_opacity(scene, lesion, lesion.uniform(0.04, 0.06), lesion.uniform(0.3, 0.4))


def _pleural_thickening(
    scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator
) -> None:
    """Bright, lumpy plaques thickening the pleura along part of the lateral chest wall."""
    a, side = scene.anatomy, _side(lesion)
    u, r = scene.lung_coords(side)
    lumps = np.clip(1 + 0.5 * _noise(lesion, scene.size, 8), 0.5, 1.5)
    thickness = lesion.uniform(0.18, 0.28) * lumps  # r is in lung half-widths along the wall
    centre = lesion.uniform(a.apex + 0.45, a.base[side > 0] - 0.2)
    stretch = _inside(lesion.uniform(0.25, 0.45) - np.abs(scene.y - centre), 0.15)
    rim = _inside(r - 1 + thickness, 0.04) * _inside(u - 0.1, 0.2) * stretch * scene.lungs[side]
    scene.att += lesion.uniform(0.4, 0.55) * rim  # brighter than the wall: calcified plaques


def _pneumonia(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A fluffy lower-zone opacity crossed by dark air bronchograms."""
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.6, 0.9)
    radius = lesion.uniform(0.12, 0.18)
    fluff = np.exp(-(_ellipse(scene, cx, cy, radius, 0.8 * radius) ** 2))
    fluff *= 1 + 0.3 * _noise(rng, scene.size, 16)
    bronchi = _peaks(18 * _hilar_angle(scene.size)[side] + lesion.uniform(0, 6), 3)
    level = lesion.uniform(0.22, 0.3) * rng.uniform(0.85, 1.1)
    scene.att += level * fluff * (1 - 0.5 * bronchi) * scene.lungs[side]


def _pneumothorax(scene: _Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Lung collapsed away from apex and wall: a dark, markingless rim and a pleural line."""
    a, side = scene.anatomy, _side(lesion)
    keep = lesion.uniform(0.55, 0.8)
    base = a.base[side > 0]
    collapsed = replace(a, lung_w=keep * a.lung_w, lung_x=a.lung_x - (1 - keep) * a.lung_w,
                        apex=base - keep * (base - a.apex))  # fmt: skip
    _, r = scene.lung_coords(side, collapsed)
    gap = _inside(r - 1, 0.02) * scene.lungs[side]
    line = np.exp(-(((r - 1) * (1 / 0.02)) ** 2)) * scene.lungs[side]
    scene.att += 0.15 * line - gap * (0.12 + scene.markings)


_SIGNS: dict[str, Callable[[_Scene, np.random.Generator, np.random.Generator], None]] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Emphysema": _emphysema,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Effusion": _effusion,
    "Fibrosis": _fibrosis,
    "Hernia": _hernia,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pleural_Thickening": _pleural_thickening,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
}
