"""One visible sign per pathology, drawn into a phantom's chest (`SIGNS`, by label name)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from cxrfusion.data.phantom_chest import (
    TISSUE,
    Anatomy,
    Scene,
    ellipse,
    hilar_angle,
    inside,
    noise,
    peaks,
)

# Each sign draws its finding into the scene. `lesion` is the same generator state at every follow-up
# of a patient (side, site, size persist); `rng` varies per image. Signs that move anatomy come first.


def _side(lesion: np.random.Generator) -> int:
    return -1 if lesion.random() < 0.5 else 1


def _lung_point(
    a: Anatomy, side: int, lesion: np.random.Generator, low: float, high: float
) -> tuple[float, float]:
    """A site in one lung, between fractions `low` and `high` of the way from apex to base."""
    depth = lesion.uniform(low, high)
    half = a.lung_w * math.sqrt(1 - (1 - depth) ** 2)
    x = side * (a.lung_x + half * lesion.uniform(-0.3, 0.65))
    return x, a.apex + depth * (a.base[side > 0] - a.apex)


def _atelectasis(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Volume loss (raised hemidiaphragm, heart pulled over) and a plate-like band of collapse."""
    a, side = scene.anatomy, _side(lesion)
    lift = lesion.uniform(0.05, 0.1)
    base = (a.base[0] - lift, a.base[1]) if side < 0 else (a.base[0], a.base[1] - lift)
    hx, hy, hw, hh = a.heart
    scene.reshape(replace(a, base=base, heart=(hx + 0.03 * side, hy, hw, hh)))
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.55, 0.85)
    length, width = lesion.uniform(0.15, 0.25), lesion.uniform(0.03, 0.05)
    band = ellipse(scene, cx, cy, length, width, tilt=lesion.uniform(-0.35, 0.35))
    scene.att += lesion.uniform(0.2, 0.3) * inside(1 - band, 0.3) * scene.lungs[side]


def _cardiomegaly(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """An enlarged heart, mostly to the patient's left: cardiothoracic ratio above one half."""
    hx, hy, hw, hh = scene.anatomy.heart
    wider, taller = lesion.uniform(1.25, 1.55), lesion.uniform(1.05, 1.2)
    heart = (hx + 0.4 * (wider - 1) * hw, hy + 0.5 * (taller - 1) * hh, wider * hw, taller * hh)
    scene.reshape(replace(scene.anatomy, heart=heart))


def _emphysema(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Hyperinflated, hyperlucent lungs with flat diaphragms and sparse markings."""
    a = scene.anatomy
    drop = lesion.uniform(0.06, 0.12)
    scene.reshape(replace(a, lung_w=a.lung_w * 1.08, apex=a.apex - 0.04, dome=a.dome * 0.3,
                          base=(a.base[0] + drop, a.base[1] + drop)))  # fmt: skip
    lungs = sum(scene.lungs.values())
    scene.att -= lungs * (lesion.uniform(0.04, 0.08) + 0.6 * scene.markings)


def _consolidation(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A dense, fairly homogeneous patch, sometimes cut flat by a fissure."""
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.2, 0.7)
    rx, ry = lesion.uniform(0.12, 0.2), lesion.uniform(0.1, 0.16)
    ragged = 0.3 * noise(lesion, scene.size, 12)
    patch = inside(1 - ellipse(scene, cx, cy, rx, ry) + ragged, 0.1)
    if lesion.random() < 0.5:
        patch *= inside(scene.y - cy + 0.3 * ry, 0.01)
    scene.att += lesion.uniform(0.25, 0.35) * rng.uniform(0.85, 1.1) * patch * scene.lungs[side]


def _edema(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Bilateral perihilar 'bat-wing' haze."""
    spread, level = lesion.uniform(0.2, 0.3), lesion.uniform(0.13, 0.2) * rng.uniform(0.85, 1.1)
    texture = 1 + 0.3 * noise(rng, scene.size, 10)
    for side, lung in scene.lungs.items():
        wing = np.exp(-(((side * scene.x - 0.2) / spread) ** 2) - (scene.y * (1 / 0.35)) ** 2)
        scene.att += level * wing * texture * lung


def _effusion(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Fluid at a lung base (sometimes both) with a meniscus climbing the lateral wall."""
    sides = (-1, 1) if lesion.random() < 0.25 else (_side(lesion),)
    for side in sides:
        u, _ = scene.lung_coords(side)
        level = scene.anatomy.base[side > 0] - lesion.uniform(0.15, 0.35)
        meniscus = lesion.uniform(0.08, 0.2) * np.clip(u, 0, 1) ** 2
        fluid = inside(scene.y - level + meniscus, 0.02)
        scene.att += 0.9 * TISSUE * fluid * scene.lungs[side]


def _fibrosis(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A reticular net of fine lines, peripheral and basal, in both lungs."""
    strands = (noise(lesion, scene.size, 32) * (1 / 0.15) for _ in range(2))
    net = np.maximum(*(np.exp(-(s * s)) for s in strands))
    level = lesion.uniform(0.16, 0.24) * rng.uniform(0.85, 1.1)
    for side, lung in scene.lungs.items():
        _, r = scene.lung_coords(side)
        periphery = np.clip((r - 0.5) * (1 / 0.35), 0, 1) * inside(scene.y + 0.2, 0.4)
        scene.att += level * net * periphery * lung


def _hernia(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A round gas lucency with a thin wall and an air-fluid level, behind the heart."""
    hx, hy, _, _ = scene.anatomy.heart
    radius = lesion.uniform(0.07, 0.12)
    cx, cy = hx + lesion.uniform(-0.08, 0.05), hy + lesion.uniform(0.0, 0.08)
    r = ellipse(scene, cx, cy, radius, radius * 0.85)
    gas = inside(1 - r, 0.15) * inside(cy + 0.4 * radius - scene.y, 0.01)
    scene.att += 0.07 * np.exp(-(((r - 1) * (1 / 0.12)) ** 2)) - 0.25 * gas


def _infiltration(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Diffuse, hazy, reticular opacity over a large part of one or both lungs."""
    sides = (-1, 1) if lesion.random() < 0.4 else (_side(lesion),)
    level = lesion.uniform(0.1, 0.16) * rng.uniform(0.85, 1.1)
    texture = np.clip(0.6 + noise(rng, scene.size, 14), 0, None)
    for side in sides:
        cx, cy = _lung_point(scene.anatomy, side, lesion, 0.3, 0.8)
        region = inside(1 - ellipse(scene, cx, cy, 0.3, lesion.uniform(0.25, 0.4)), 0.4)
        scene.att += level * region * texture * scene.lungs[side]


def _round_opacity(scene: Scene, lesion: np.random.Generator, radius: float, level: float) -> None:
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.15, 0.8)
    r = ellipse(scene, cx, cy, radius, radius * lesion.uniform(0.85, 1.1))
    scene.att += level * inside(1 - r, 0.25) * scene.lungs[side]


def _mass(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A large round opacity (over 3 cm)."""
    _round_opacity(scene, lesion, lesion.uniform(0.09, 0.15), lesion.uniform(0.28, 0.38))


def _nodule(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """One or two small, dense, round opacities."""
    for _ in range(1 + (lesion.random() < 0.5)):
        _round_opacity(scene, lesion, lesion.uniform(0.04, 0.06), lesion.uniform(0.3, 0.4))


def _pleural_thickening(
    scene: Scene, lesion: np.random.Generator, rng: np.random.Generator
) -> None:
    """Bright, lumpy plaques thickening the pleura along part of the lateral chest wall."""
    a, side = scene.anatomy, _side(lesion)
    u, r = scene.lung_coords(side)
    lumps = np.clip(1 + 0.5 * noise(lesion, scene.size, 8), 0.5, 1.5)
    thickness = lesion.uniform(0.18, 0.28) * lumps  # r is in lung half-widths along the wall
    centre = lesion.uniform(a.apex + 0.45, a.base[side > 0] - 0.2)
    stretch = inside(lesion.uniform(0.25, 0.45) - np.abs(scene.y - centre), 0.15)
    rim = inside(r - 1 + thickness, 0.04) * inside(u - 0.1, 0.2) * stretch * scene.lungs[side]
    scene.att += lesion.uniform(0.4, 0.55) * rim  # brighter than the wall: calcified plaques


def _pneumonia(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """A fluffy lower-zone opacity crossed by dark air bronchograms."""
    side = _side(lesion)
    cx, cy = _lung_point(scene.anatomy, side, lesion, 0.6, 0.9)
    radius = lesion.uniform(0.12, 0.18)
    fluff = np.exp(-(ellipse(scene, cx, cy, radius, 0.8 * radius) ** 2))
    fluff *= 1 + 0.3 * noise(rng, scene.size, 16)
    bronchi = peaks(18 * hilar_angle(scene.size)[side] + lesion.uniform(0, 6), 3)
    level = lesion.uniform(0.22, 0.3) * rng.uniform(0.85, 1.1)
    scene.att += level * fluff * (1 - 0.5 * bronchi) * scene.lungs[side]


def _pneumothorax(scene: Scene, lesion: np.random.Generator, rng: np.random.Generator) -> None:
    """Lung collapsed away from apex and wall: a dark, markingless rim and a pleural line."""
    a, side = scene.anatomy, _side(lesion)
    keep = lesion.uniform(0.55, 0.8)
    base = a.base[side > 0]
    collapsed = replace(a, lung_w=keep * a.lung_w, lung_x=a.lung_x - (1 - keep) * a.lung_w,
                        apex=base - keep * (base - a.apex))  # fmt: skip
    _, r = scene.lung_coords(side, collapsed)
    gap = inside(r - 1, 0.02) * scene.lungs[side]
    line = np.exp(-(((r - 1) * (1 / 0.02)) ** 2)) * scene.lungs[side]
    scene.att += 0.15 * line - gap * (0.12 + scene.markings)


SIGNS: dict[str, Callable[[Scene, np.random.Generator, np.random.Generator], None]] = {
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
