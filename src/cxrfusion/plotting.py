"""The one place figures are made and saved, with matplotlib's object API (no pyplot).

`Figure` + the Agg canvas draw off-screen without touching matplotlib's global backend or
pyplot's figure registry, so importing cxrfusion changes no global state and a long run never
accumulates open figures. The plots themselves live with their stage (data/figures.py,
training/curves.py, evaluation/plots.py) because each stage may only import earlier ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrfusion.atomic import atomic_path


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An off-screen figure of `figsize` inches, drawn by the Agg canvas."""
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Save atomically (the file's suffix names the format) and release the figure.

    A figure made through pyplot (by code outside cxrfusion) is also closed in pyplot's
    registry; pyplot is never imported here for that.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip("."))
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
    return path
