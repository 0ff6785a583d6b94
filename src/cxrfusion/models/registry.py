"""Models by name: `create_model("fusion", weights="imagenet")`; any timm backbone name also works."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import timm

from cxrfusion.errors import CxrError
from cxrfusion.labels import NUM_LABELS
from cxrfusion.models.base import CxrModel
from cxrfusion.models.weights import load_weights

Builder = Callable[..., CxrModel]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[B], B]:
    """Class or function decorator: `create_model(name, num_classes=..., **kw)` will call it."""

    def decorate(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """The registered names (any other timm model name is accepted too)."""
    return sorted(_REGISTRY)


def create_model(
    name: str, num_classes: int = NUM_LABELS, weights: str | Path = "none", **kwargs: object
) -> CxrModel:
    """Build a model by name and load its backbone weights.

    Args:
        name: a registered name (`list_models()`) or any timm model name, which gets the
            report's head (`TimmClassifier`).
        num_classes: number of output logits.
        weights: "imagenet" (timm download), "none" (random init) or a local weights file
            (see `cxrfusion.models.weights.load_weights`).
        kwargs: passed to the model's constructor (e.g. `dropout=0.3`).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    elif timm.is_model(name):
        from cxrfusion.models.heads import TimmClassifier  # heads imports this module: not at top

        model = TimmClassifier(name, num_classes=num_classes, **kwargs)
    else:
        choices = ", ".join(list_models())
        raise CxrError(
            f"unknown model {name!r}: choose one of {choices} or any timm model name "
            "(timm.list_models())"
        )
    load_weights(model, weights)
    return model
