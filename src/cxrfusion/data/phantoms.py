"""Render a synthetic chest radiograph: a patient's chest, their findings' signs, an exposure.

The chest (`phantom_chest`) has a body, two lung fields with vascular markings, heart, ribs,
clavicles, spine and trachea, varied in anatomy, pose, exposure and noise; each finding adds its sign
(`phantom_signs`), drawn at `_CONSPICUITY` times its natural contrast. A patient's seed stream fixes
their anatomy and lesion sites across follow-ups; an image's stream fixes pose, exposure and noise.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from cxrfusion.data.phantom_chest import draw_chest, noise, sample_anatomy
from cxrfusion.data.phantom_signs import SIGNS
from cxrfusion.labels import LABEL_INDEX, NO_FINDING, multi_hot

# Seed-sequence streams: a patient's anatomy and lesions, an image's pose and noise, the table.
PATIENT_STREAM, IMAGE_STREAM, TABLE_STREAM = 0, 1, 2

# Every sign's change to the healthy chest is drawn this many times stronger than its anatomy alone
# would make it. Drawn 1:1, a 64 px nodule is ~10 of 4,096 pixels and the report's CNN (no
# normalisation layer) was still below 0.8 validation macro AUC after 12 CPU epochs; at 2.5x it
# passes 0.9 in 12 (tests/test_training.py), so demos and tests show learning in CPU minutes.
_CONSPICUITY = 2.5


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
    return render(active, seed, 0, 0, size)


def stream(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per key: drawing more from one stream leaves the others alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def render(active: np.ndarray, seed: int, patient: int, index: int, size: int) -> np.ndarray:
    """Pixels of one image: the patient fixes anatomy and lesion sites, the image pose and noise."""
    rng = stream(seed, IMAGE_STREAM, index, 0)
    scene = draw_chest(sample_anatomy(stream(seed, PATIENT_STREAM, patient, 0)), rng, size)
    healthy = scene.att.copy()
    for name, sign in SIGNS.items():
        key = LABEL_INDEX[name] + 1  # each sign its own streams: adding one changes nothing else
        if active[key - 1]:
            sign(
                scene,
                stream(seed, PATIENT_STREAM, patient, key),
                stream(seed, IMAGE_STREAM, index, key),
            )
    scene.att = healthy + _CONSPICUITY * (scene.att - healthy)
    return _expose(scene.att, rng)


def _expose(att: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure: contrast, brightness, a slow gradient, gamma and quantum noise, to uint8."""
    size = att.shape[0]
    image = att * rng.uniform(0.95, 1.2) + rng.uniform(-0.07, 0.05) + 0.04 * noise(rng, size, 3)
    gamma = np.linspace(0, 1, 1024, dtype=np.float32) ** rng.uniform(0.8, 1.25)
    image = gamma[(np.clip(image, 0, 1) * 1023).astype(np.intp)]
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.005, 0.02)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
