"""DICOMweb intake: QIDO-RS finds instances, WADO-RS fetches the new ones (metadata first, pixels
only for those the rules accept), the model predicts, STOW-RS stores the SR and capture back.

Idempotent through the `State`: an instance done (processed, skipped, failed) is never fetched
again, and results carry UIDs derived from the source and the model, so resuming after a crash
resends the same objects instead of duplicating them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from cxrfusion.dicom.pipeline import Intake, Steps, Transient
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)
T = TypeVar("T")
_SOP_INSTANCE_UID, _SERIES_UID, _STUDY_UID = "00080018", "0020000E", "0020000D"
_RETRIED_STATUS = frozenset({408, 429})  # and every 5xx
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class AccessRefused(CxrError):
    """The server refused our credentials: nothing else will work either."""


@dataclass(frozen=True)
class DicomWebSettings:
    """Where the PACS is and how to talk to it.

    Args:
        url: the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web.
        user / password: HTTP basic authentication (both or neither).
        token: a bearer token instead.
        retries: attempts per request on 5xx, 408, 429 or a dropped connection.
        backoff_s: first wait between attempts, doubled each time.
        timeout_s: per request.
    """

    url: str
    user: str | None = None
    password: str | None = None
    token: str | None = None
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CxrError(f"--dicomweb {self.url!r}: expected an http(s):// URL")
        if (self.user is None) != (self.password is None):
            raise CxrError("--user and --password go together")
        if self.token is not None and self.user is not None:
            raise CxrError("give --user/--password or --token, not both")
        if self.retries < 1 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise CxrError("retries must be >= 1, backoff >= 0 and timeout > 0")


def make_client(settings: DicomWebSettings) -> DICOMwebClient:
    """A DICOMweb client with the settings' authentication; retries are `call`'s, not its own."""
    session = requests.Session()
    if settings.user is not None:
        session.auth = (settings.user, settings.password)
    if settings.token is not None:
        session.headers["Authorization"] = f"Bearer {settings.token}"
    client = DICOMwebClient(url=settings.url, session=session, timeout=settings.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def call(settings: DicomWebSettings, what: str, request: Callable[[], T]) -> T:
    """Run a request, retrying transient failures with exponential backoff.

    Raises:
        AccessRefused: authentication refused (401/403), at once: nothing else will work either.
        requests.RequestException: still failing after `settings.retries` attempts.
    """
    for attempt in range(1, settings.retries + 1):
        try:
            return request()
        except requests.HTTPError as error:
            code = error.response.status_code if error.response is not None else 0
            if code in (401, 403):
                raise AccessRefused(
                    f"{settings.url}: {what} refused with HTTP {code}: check --user/--password "
                    "or --token"
                ) from None
            if (code < 500 and code not in _RETRIED_STATUS) or attempt == settings.retries:
                raise
            reason = f"HTTP {code}"
        except _TRANSIENT as error:
            if attempt == settings.retries:
                raise
            reason = type(error).__name__
        wait = settings.backoff_s * 2 ** (attempt - 1)
        log.warning("%s: %s, retry %d in %.1f s", what, reason, attempt, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


class Poller:
    """Polls a DICOMweb server and writes results back.

    Args:
        client: from `make_client`.
        settings: the same settings (retries).
        intake: the model loop, the state and the audit log.
    """

    def __init__(self, client: DICOMwebClient, settings: DicomWebSettings, intake: Intake) -> None:
        self.client = client
        self.settings = settings
        self.intake = intake

    def run(self, interval_s: float, once: bool, stop: threading.Event) -> Counter:
        """Poll once, or every `interval_s` seconds until `stop` is set; the outcomes counted.

        Raises:
            CxrError: the server cannot be searched (with `once`; otherwise it is logged and the
                next poll tries again).
        """
        total: Counter = Counter()
        while True:
            try:
                total += self.poll(stop)
            except requests.RequestException as error:
                message = f"{self.settings.url}: cannot search for instances ({_short(error)})"
                if once:
                    raise CxrError(message) from None
                log.warning("%s; next poll in %g s", message, interval_s)
            if once or stop.wait(interval_s):
                return total

    def poll(self, stop: threading.Event | None = None) -> Counter:
        """Handle every instance not done yet; the outcomes counted (processed, skipped,
        retry, failed). Stops between instances when `stop` is set."""
        found = call(
            self.settings,
            "QIDO-RS search",
            lambda: self.client.search_for_instances(get_remaining=True),
        )
        counts: Counter = Counter()
        for item in found:
            if stop is not None and stop.is_set():
                break
            uids = tuple(item.get(tag, {}).get("Value", [""])[0] for tag in _UID_TAGS)
            if not all(uids) or self.intake.state.done(uids[2]):
                continue
            counts[self._handle(*uids)] += 1
        log.info("poll: %s", dict(counts) or "nothing new")
        return counts

    def _handle(self, study: str, series: str, sop: str) -> str:
        """One instance: its metadata screened first, its pixels fetched only if accepted."""
        ids = Dataset()
        ids.StudyInstanceUID, ids.SeriesInstanceUID, ids.SOPInstanceUID = study, series, sop
        steps = Steps(
            header=lambda: Dataset.from_json(
                self._request(
                    f"WADO-RS metadata of {sop}",
                    lambda: self.client.retrieve_instance_metadata(study, series, sop),
                ),
                _no_bulk_data,
            ),
            dataset=lambda: self._request(
                f"WADO-RS {sop}", lambda: self.client.retrieve_instance(study, series, sop)
            ),
            send=lambda results: self._request(
                f"STOW-RS results of {sop}",
                lambda: self.client.store_instances(
                    [results.sr, results.sc], study_instance_uid=study
                ),
            ),
        )
        return self.intake.handle(ids, steps)

    def _request(self, what: str, request: Callable[[], T]) -> T:
        """`call`, a request still failing after its retries being `Transient` for the instance."""
        try:
            return call(self.settings, what, request)
        except requests.RequestException as error:
            raise Transient(_short(error)) from None


_UID_TAGS = (_STUDY_UID, _SERIES_UID, _SOP_INSTANCE_UID)


def _short(error: requests.RequestException) -> str:
    """An HTTP status or the kind of connection failure, on one line."""
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    return type(error).__name__


def _no_bulk_data(*_: object) -> bytes:
    """Screening needs the header only: bulk data (the pixels) is not fetched."""
    return b""
