"""The HTTP service and its web page: `create_app(classifier, ServeSettings(...))`."""

from cxrfusion.serving.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
