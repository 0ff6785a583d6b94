"""Models: logits out, `features` then a `head` holding all dropout; built by name.

model = create_model("fusion", weights="imagenet")   # or "none", or a local weights file
logits = model(images)                                # (B, 14); sigmoid at the edges
"""

from cxrfusion.models import fusion, heads, simple_cnn  # noqa: F401  (registers the models)
from cxrfusion.models.base import CxrModel, count_parameters
from cxrfusion.models.registry import create_model, list_models, register_model
from cxrfusion.models.weights import load_weights, save_backbone_weights

__all__ = [
    "CxrModel",
    "count_parameters",
    "create_model",
    "list_models",
    "load_weights",
    "register_model",
    "save_backbone_weights",
]
