"""cxrfusion: multi-label chest X-ray classifiers with calibrated uncertainty.

`from cxrfusion import Classifier` loads the inference API on first use, so that `import cxrfusion`
itself stays light (no torch).
"""

__version__ = "0.1.0"
__all__ = ["Classifier"]


def __getattr__(name: str) -> object:
    if name == "Classifier":
        from cxrfusion.inference.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'cxrfusion' has no attribute {name!r}")
