"""The healthy chest of a phantom: anatomy, pose, lungs, heart, ribs, spine and vascular markings.

A `Scene` holds the body coordinates of every pixel and the attenuation drawn so far; the signs in
`phantom_signs` draw into it. Every sign and the chest share the helpers here (`inside`, `ellipse`,
`noise`, `peaks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Body coordinates: x to the image's right, y down, the chest spanning about -1..1. Attenuation `att`
# runs from ~0.1 (air) to ~0.8 (bone) and is bright on the radiograph, as on a real one. Everything
# stays float32 (scalars as Python floats) because float64 doubles the cost of every array step.

TISSUE = 0.36  # how much darker aerated lung is than soft tissue
HILUM = (0.17, -0.02)  # |x| and y of the hila, where vessels and bronchi fan out from


@dataclass(frozen=True)
class Anatomy:
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
class Scene:
    """The picture being drawn: body coordinates of each pixel, attenuation, lungs, markings."""

    x: np.ndarray
    y: np.ndarray
    anatomy: Anatomy
    att: np.ndarray
    lungs: dict[int, np.ndarray]  # side (-1 image left, +1 image right) -> soft mask, heart removed
    markings: np.ndarray  # the vascular markings already added to `att`

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def lung_coords(self, side: int, anatomy: Anatomy | None = None) -> tuple[np.ndarray, ...]:
        """Lateral coordinate u (0 at the lung's axis, 1 at its rim) and radius r (1 at the pleura)."""
        a = anatomy or self.anatomy
        base = a.base[side > 0]
        u = (side * self.x - a.lung_x) * (1 / a.lung_w)
        v = np.minimum(self.y - base, 0) * (1 / (base - a.apex))
        v *= v
        return u, np.sqrt(u * u + v * (0.55 + 0.45 * v))  # a blunt apex, a convex lateral wall

    def reshape(self, anatomy: Anatomy) -> None:
        """Move the heart, lungs or diaphragm: what turns from lung to tissue brightens, and back."""
        old = sum(self.lungs.values())
        self.anatomy = anatomy
        self.lungs = _lung_masks(self)
        self.att -= TISSUE * (sum(self.lungs.values()) - old)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """One patient's chest, drawn from the patient's own stream (the same at every follow-up)."""
    lung_x, lung_w, base = rng.uniform(0.44, 0.48), rng.uniform(0.29, 0.34), rng.uniform(0.5, 0.6)
    return Anatomy(
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
def hilar_angle(size: int) -> dict[int, np.ndarray]:
    """Angle of each pixel around each hilum, for vessels and bronchi (arctan2 is costly)."""
    gx, gy = _grid(size)
    return {side: np.arctan2(gy - HILUM[1], side * gx - HILUM[0]) for side in (-1, 1)}


def _pose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates of each pixel under a small random rotation, zoom and shift."""
    gx, gy = _grid(size)
    angle = float(np.clip(rng.normal(0, 0.04), -0.09, 0.09))
    zoom = rng.uniform(0.93, 1.06)
    tx, ty = rng.normal(0, 0.03), rng.normal(0, 0.03)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    return cos * (gx - tx) + sin * (gy - ty), cos * (gy - ty) - sin * (gx - tx)


def inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft step: 1 where `distance` > 0 (inside), 0 outside, a linear ramp `edge` wide."""
    return np.clip(distance * (1 / edge) + 0.5, 0, 1)


def peaks(phase: np.ndarray, squarings: int) -> np.ndarray:
    """Narrow periodic ridges: ((1 + cos) / 2) ** (2 ** squarings), by squaring (fast)."""
    ridge = 0.5 + 0.5 * np.cos(phase)
    for _ in range(squarings):
        ridge *= ridge
    return ridge


def ellipse(
    scene: Scene, cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0
) -> np.ndarray:
    """Normalised radius around (cx, cy): 1 on the ellipse with half-axes rx, ry turned by `tilt`."""
    dx, dy = scene.x - cx, scene.y - cy
    cos, sin = math.cos(tilt), math.sin(tilt)
    return np.sqrt(((cos * dx + sin * dy) / rx) ** 2 + ((cos * dy - sin * dx) / ry) ** 2)


def noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise (std ~0.7) with about `cells` features across the image."""
    coarse = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _lung_masks(scene: Scene) -> dict[int, np.ndarray]:
    a = scene.anatomy
    hx, hy, hw, hh = a.heart
    heart = inside(1 - ellipse(scene, hx, hy, hw, hh, tilt=0.35), 0.06)
    # Below its widest part the heart rests on the diaphragm: no lung under it.
    seat = inside(scene.y - hy - 0.3 * hh, 0.05) * inside(0.8 * hw - np.abs(scene.x - hx), 0.06)
    heart = np.maximum(heart, seat)
    knob = inside(1 - ellipse(scene, 0.1, -0.33, 0.08, 0.07), 0.05)
    masks = {}
    for side in (-1, 1):
        u, r = scene.lung_coords(side)
        dome = a.base[side > 0] - a.dome * np.cos(np.clip(u, -1, 1) * (math.pi / 2))
        masks[side] = inside(1 - r, 0.05) * inside(dome - scene.y, 0.02) * (1 - heart - knob)
    return masks


def draw_chest(a: Anatomy, rng: np.random.Generator, size: int) -> Scene:
    """The healthy chest of anatomy `a` under a random pose, before any sign and exposure."""
    x, y = _pose(rng, size)
    ax = np.abs(x)
    shoulder = np.clip((-0.75 - y) * (1 / 0.3), 0, 1)
    half = np.maximum(a.body * np.sqrt(1 - shoulder * shoulder), 0.28)
    body = inside(half - ax, 0.04)
    thickness = np.sqrt(np.clip(1 - (x * (1 / (a.body + 0.04))) ** 2, 0, 1))
    att = 0.1 + body * (0.2 + 0.4 * thickness)
    scene = Scene(x, y, a, att, {}, np.zeros_like(x))
    scene.lungs = _lung_masks(scene)
    lungs = sum(scene.lungs.values())
    att -= TISSUE * lungs
    # Ribs: posterior arcs (rising from the spine, then falling laterally), fainter anterior ones,
    # both plainer against aerated lung than against soft tissue.
    cage = body * inside(ax - 0.07, 0.02) * inside(0.6 - y, 0.1) * (0.4 + 0.6 * lungs)
    wavenumber = 2 * math.pi / a.rib_gap
    posterior = (y + 0.25 * ax - 0.8 * x * x) * wavenumber + a.rib_phase
    anterior = (y + 0.55 * ax) * (wavenumber / 1.2) + a.rib_phase
    ribs = 0.09 * peaks(posterior, 3) + 0.04 * peaks(anterior, 3) * inside(ax - 0.3, 0.1)
    att += cage * ribs
    clavicle = np.abs(y + 0.72 + 0.12 * (ax - 0.1)) - 0.035 * inside(0.6 - ax, 0.05)
    att += 0.1 * inside(-clavicle, 0.015) * inside(ax - 0.06, 0.02)
    vertebrae = 0.8 + 0.2 * np.cos(y * (2 * math.pi / 0.1))
    att += 0.1 * inside(0.065 - ax, 0.015) * vertebrae * body
    att -= 0.08 * inside(0.03 - ax, 0.015) * inside(-0.3 - y, 0.05)  # trachea
    if a.bubble:
        stomach = ellipse(scene, a.lung_x, a.base[1] + 0.1 + a.bubble, 1.3 * a.bubble, a.bubble)
        att -= 0.12 * inside(1 - stomach, 0.3)
    _add_markings(scene, rng)
    return scene


def _add_markings(scene: Scene, rng: np.random.Generator) -> None:
    """Vessels fanning out from the hila, fading towards the periphery, plus fine texture."""
    warp = 2.5 * noise(rng, scene.size, 6)
    grain = 0.015 * noise(rng, scene.size, 24)
    for side, lung in scene.lungs.items():
        dx, dy = side * scene.x - HILUM[0], scene.y - HILUM[1]
        dist2 = dx * dx + dy * dy
        fan = peaks(30 * hilar_angle(scene.size)[side] + warp, 3)
        scene.markings += lung * (0.09 * fan * np.exp(np.sqrt(dist2) * (-1 / 0.35)) + grain)
        scene.att += 0.1 * np.exp(dist2 * (-1 / 0.006))  # hilum
    scene.att += scene.markings
