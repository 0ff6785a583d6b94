"""The HTTP service and its web page: `create_app(classifier, ServeSettings(...))`.

Loaded on first use, so that the decoding processes (`serving.decoder`) import no web framework.
"""

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from cxrfusion.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'cxrfusion.serving' has no attribute {name!r}")
