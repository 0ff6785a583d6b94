"""cxrfusion: multi-label chest X-ray classifiers with calibrated uncertainty."""

__version__ = "0.1.0"
