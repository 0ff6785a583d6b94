"""The HTTP service: `create_app(classifier, settings)` gives a FastAPI app over one Classifier.

Routes: `POST /predict` (multipart image in field `file`; `heatmap=true` adds Grad-CAM overlays
of the most probable pathologies as base64 PNGs, `image=true` the model's input image; the JSON is
`Prediction.to_dict` plus `elapsed_ms`, queue wait included), `GET /model` (the model card),
`GET /health`, and `GET /` (a web page for single studies, served from `static/`). Limits are
declared once in `ServeSettings` and enforced at the edge: the Host header (400 unless one the
server answers to, against DNS rebinding), body size (413), form parts (400), file type (415),
undecodable image, a JPEG of too many scans or a decode over its time limit (422; decoding runs
in child processes, `decoder.DecodePool`, never on the model thread), a bounded model queue (503 +
Retry-After) whose one thread gathers concurrent requests into batches (`batcher.Batcher`; each
request gets the answer it would get alone), and an optional bearer token (401, on /predict and /model; the page, its files and
/health stay open so that a load balancer and a browser can reach them). Every answer, errors
included, carries the same security headers.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cxrfusion.data.imageio import Radiograph
from cxrfusion.data.jpeg_guard import MAX_JPEG_SCANS, check_jpeg_scans
from cxrfusion.errors import CxrError
from cxrfusion.serving.decoder import DecodePool
from cxrfusion.serving.upload import Upload, read_upload
from cxrfusion.serving.worker import Busy, ModelWorker

if TYPE_CHECKING:
    from cxrfusion.inference.classifier import Classifier, PreparedImage

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# The page loads only its own files; images arrive as data: URLs.
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# A name or IPv4 address (optionally "*." before it), a bracketed IPv6 address, or "*".
_HOST_PATTERN = re.compile(r"\*|(\*\.)?[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": _CSP,
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the service, checked at construction.

    Args:
        max_upload_bytes: largest accepted image file (default 20 MB: a large detector DICOM).
        queue_size: requests held at once, decoding, running or waiting for the model (default
            16); one more gets 503 with Retry-After instead of an unbounded wait.
        token: when set, /predict and /model require `Authorization: Bearer <token>`.
        heatmaps: allow Grad-CAM heatmaps (`heatmap=true`) when the classifier's engine gives
            them (`Classifier.supports_gradcam`); they cost a backward pass each.
        allowed_hosts: Host header values answered (Starlette's TrustedHostMiddleware
            patterns: "example.org", "*.example.org", "*" for any); the default, loopback
            names, suits a server bound to 127.0.0.1 and keeps DNS-rebinding pages out.
        decode_timeout_s: seconds one upload may take to decode before its decoding process
            is killed (default 20: a 20 MP JPEG 2000 DICOM takes ~7 s on 2 busy cores).
        decode_workers: processes decoding uploads at once (default 2).
        max_jpeg_scans: JPEGs with more scans are refused before decoding (default 100;
            encoders write about 10, crafted files thousands: `data.jpeg_guard`).
        max_batch: most requests the model thread predicts in one call (default 8; 1 predicts
            each alone). Batching changes no answer: each image's dropout masks are its own.
        max_wait_ms: longest the first request of a batch waits for others to join (default
            5 ms, against a model call of tens to hundreds of ms; requests that arrive while the
            model is busy join the next batch without waiting).
    """

    max_upload_bytes: int = 20 * 2**20
    queue_size: int = 16
    token: str | None = None
    heatmaps: bool = True
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    decode_timeout_s: float = 20.0
    decode_workers: int = 2
    max_jpeg_scans: int = MAX_JPEG_SCANS
    max_batch: int = 8
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise CxrError(
                f"max upload size (--max-upload-mb) must be positive, got {self.max_upload_bytes} bytes"
            )
        if self.queue_size < 1:
            raise CxrError(f"queue size (--queue) must be at least 1, got {self.queue_size}")
        if self.token is not None and not self.token.strip():
            raise CxrError(
                "token ($CXRFUSION_TOKEN or --token) must not be empty; leave it out to serve "
                "without one"
            )
        _check_hosts(self.allowed_hosts)
        if not self.decode_timeout_s > 0:
            raise CxrError(
                "decode time limit (--decode-timeout) must be positive, "
                f"got {self.decode_timeout_s}"
            )
        if self.decode_workers < 1:
            raise CxrError(f"decode_workers must be at least 1, got {self.decode_workers}")
        if self.max_jpeg_scans < 1:
            raise CxrError(f"max_jpeg_scans must be at least 1, got {self.max_jpeg_scans}")
        if self.max_batch < 1:
            raise CxrError(f"batch size (--max-batch) must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms < float("inf"):
            raise CxrError(
                f"batch wait (--max-wait-ms) must be a number of milliseconds >= 0, "
                f"got {self.max_wait_ms}"
            )


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `classifier` under `settings` (defaults: `ServeSettings()`)."""
    settings = settings or ServeSettings()
    heatmaps = settings.heatmaps and classifier.supports_gradcam
    worker: ModelWorker[_Request, dict] = ModelWorker(
        lambda requests: _predict_batch(classifier, requests),
        settings.queue_size,
        settings.max_batch,
        settings.max_wait_ms / 1000,
    )
    decoder = DecodePool(
        settings.decode_workers, settings.decode_timeout_s, classifier.spec.cache_size
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()
        decoder.close()

    app = FastAPI(
        title="cxrfusion",
        summary="Chest X-ray classifier with MC-dropout uncertainty (research use, not a medical "
        "device)",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc load their scripts from a CDN: nothing here may come from the
        # internet (and the CSP would block it). /openapi.json stays.
        docs_url=None,
        redoc_url=None,
    )
    authorized = _bearer_check(settings.token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)

    @app.middleware("http")  # added last, so outermost: it also marks the Host refusals
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # Answered by Starlette's outermost middleware, past `security_headers`: add them here.
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"detail": "internal error; see the server log"},
            status_code=500,
            headers=SECURITY_HEADERS,
        )

    @app.get("/health")
    async def health() -> dict:
        """Liveness and load; open even with a token."""
        return {
            "status": "ok",
            "queue": {"held": worker.held, "capacity": worker.capacity},
            "auth": settings.token is not None,
            "heatmaps": heatmaps,
            "max_upload_bytes": settings.max_upload_bytes,
        }

    @app.get("/model", dependencies=[Depends(authorized)])
    async def model_card() -> dict:
        return classifier.card()

    @app.post("/predict", dependencies=[Depends(authorized)])
    async def predict(request: Request) -> JSONResponse:
        upload = await read_upload(request, settings.max_upload_bytes)
        heatmap = _flag(request, upload, "heatmap")
        if heatmap and not heatmaps:
            raise HTTPException(400, "heatmaps are disabled on this server")
        image = _flag(request, upload, "image")

        async def prepare() -> _Request:
            check_jpeg_scans(upload.data, upload.name, settings.max_jpeg_scans)
            decoded = await decoder.decode(upload.name, upload.data)
            prepared = await asyncio.to_thread(_prepare, classifier, upload.name, decoded)
            return _Request(prepared, heatmap, image)

        start = time.perf_counter()
        try:
            result = await worker.run(prepare)
        except Busy as busy:
            raise HTTPException(
                503, str(busy), headers={"Retry-After": str(busy.retry_after)}
            ) from None
        except CxrError as error:
            raise HTTPException(422, str(error)) from None
        result["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return JSONResponse(result)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _bearer_check(token: str | None) -> Any:
    """A dependency refusing requests without `Authorization: Bearer <token>` (401)."""
    challenge = {"WWW-Authenticate": "Bearer"}

    async def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                401, "missing bearer token: send 'Authorization: Bearer <token>'", challenge
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "wrong bearer token", challenge)

    return check


def _flag(request: Request, upload: Upload, name: str) -> bool:
    """A yes/no option from the query string or a form field (default no)."""
    value = request.query_params.get(name, upload.fields.get(name, "")).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise HTTPException(400, f"{name} must be true or false, got {value[:20]!r}")


def _check_hosts(hosts: tuple[str, ...]) -> None:
    """Host patterns as TrustedHostMiddleware takes them: names, "*.domain" or "*"."""
    if not hosts:
        raise CxrError("allowed hosts (--allowed-hosts) must name at least one host, or '*'")
    for host in hosts:
        if not _HOST_PATTERN.fullmatch(host):
            raise CxrError(
                f"allowed host (--allowed-hosts) {host!r}: give a host name or address without "
                "scheme or port, '*.domain', or '*'"
            )


@dataclass(frozen=True)
class _Request:
    """An upload ready for the model, and what its client asked for besides the prediction."""

    prepared: PreparedImage
    heatmap: bool
    image: bool


def _prepare(classifier: Classifier, name: str, decoded: Radiograph) -> PreparedImage:
    """Off the model thread: a decoded upload at model input size, with every warning."""
    prepared = classifier.prepare(decoded.pixels, name=name)
    warning = "; ".join(filter(None, [decoded.warning, prepared.warning]))
    return dataclasses.replace(prepared, warning=warning)


def _predict_batch(classifier: Classifier, requests: Sequence[_Request]) -> list[dict]:
    """On the model thread: predict a batch of uploads, each exactly as it would be alone, and
    encode the JSON-ready results."""
    predictions = classifier.predict_prepared([r.prepared for r in requests], independent=True)
    results = []
    for request, prediction in zip(requests, predictions, strict=True):
        if request.heatmap:
            prediction.heatmaps = classifier.explain(prediction)
        result = prediction.to_dict(heatmap_png=request.heatmap)
        if request.image:
            result["image"] = _png_base64(prediction.image)
        results.append(result)
    return results


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
