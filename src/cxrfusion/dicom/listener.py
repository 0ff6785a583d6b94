"""C-STORE intake: a pynetdicom SCP whose store handler only checks who calls, writes the instance
to a spool folder and answers; one worker thread takes spooled files through the model loop
(`Intake`, the same as polling's) and C-STOREs the results to a destination.

A spooled file stays until its results are sent (or it is skipped, or failed for good), so a
restart loses nothing: files left in the spool are handled first. The state makes it idempotent:
an instance already done is dropped, not sent twice, and so are our own outputs routed back.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from cxrfusion.atomic import atomic_path
from cxrfusion.dicom.dimse import (
    SUCCESS,
    Destination,
    check_ae_title,
    check_port,
    listen_error,
    send,
)
from cxrfusion.dicom.pipeline import Intake, Steps
from cxrfusion.dicom.results import DicomResults
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)
# C-STORE statuses the handler answers with (PS3.7 C.4.2.1.4, PS3.4 B.2.3).
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # also what makes it safe as a file name


@dataclass(frozen=True)
class ListenSettings:
    """Where to listen, whom to accept, where results go.

    Args:
        destination: the node the SR and capture are C-STOREd to.
        spool: the folder received instances wait in until their results are sent.
        ae_title: our AE title (called AE title of incoming associations, calling of outgoing).
        host: the address to listen on: loopback unless a PACS elsewhere must reach us.
        port: the DICOM port.
        allowed: calling AE titles accepted; default: the destination's alone.
        queue_size: spooled files waiting for the worker in memory; more wait in the spool.
        retry_s: seconds idle before the spool is looked at again (files whose results could not
            be sent are tried again then).
        timeout_s: of each association, message and network read when sending.
    """

    destination: Destination
    spool: Path
    ae_title: str = "CXRFUSION"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed: tuple[str, ...] = ()
    queue_size: int = 64
    retry_s: float = 60.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "--ae-title"))
        check_port(self.port)
        allowed = tuple(check_ae_title(t, "--allow-ae") for t in self.allowed)
        if not allowed and self.host not in _LOOPBACK:
            raise CxrError(
                f"--host {self.host} takes associations from other machines: name the calling AE "
                "titles to accept with --allow-ae (AE titles are not authenticated, and the "
                "default, the destination's, is easy to guess)"
            )
        object.__setattr__(self, "allowed", allowed or (self.destination.ae_title,))
        if self.queue_size < 1:
            raise CxrError(f"queue size must be >= 1, got {self.queue_size}")
        if self.retry_s <= 0 or self.timeout_s <= 0:
            raise CxrError("--retry-interval and the timeout must be > 0 seconds")


class Spool:
    """Received instances waiting for their results, one file per SOP Instance UID.

    Args:
        folder: created on first write; failed instances are moved to its `failed/`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def write(self, uid: str, data: bytes) -> Path:
        """Store one instance's file (DICOM file format) atomically; its path."""
        path = self.folder / f"{uid}.dcm"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return path

    def pending(self) -> list[Path]:
        """The waiting files, oldest first (as they arrived)."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.glob("*.dcm") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path) -> Path:
        """Move a file that failed for good to `failed/`, out of the way of later passes."""
        target = self.folder / "failed" / path.name
        target.parent.mkdir(exist_ok=True)
        return path.replace(target)


@dataclass
class _Progress:
    """What the worker did, for the summary, and the bug that stopped it, if any."""

    counts: Counter = field(default_factory=Counter)
    error: BaseException | None = None


class Listener:
    """The C-STORE SCP and its worker.

    Args:
        settings: validated settings.
        intake: the model loop with its state and audit log; used by the worker thread only.
        sender: C-STOREs one instance's results (default: `dimse.send` to the destination).
    """

    def __init__(
        self,
        settings: ListenSettings,
        intake: Intake,
        sender: Callable[[DicomResults], None] | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.spool = Spool(settings.spool)
        self.progress = _Progress()
        self._send = sender or self._c_store
        self._queue: queue.Queue[Path | None] = queue.Queue(settings.queue_size)
        self._overflow = threading.Event()  # a file did not fit in the queue: look at the spool
        self._stop = threading.Event()
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        """Listen and start the worker, which first handles what an earlier run left.

        Raises:
            CxrError: the address cannot be listened on (in use, privileged).
        """
        settings = self.settings
        ae = AE(ae_title=settings.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)  # C-ECHO, the PACS's "test connection"
        ae.require_calling_aet = list(settings.allowed)
        ae.require_called_aet = True
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, _on_rejected)]
        try:
            self._server = ae.start_server(
                (settings.host, settings.port), block=False, evt_handlers=handlers
            )
        except OSError as error:
            raise CxrError(listen_error(settings.host, settings.port, error)) from None
        self._ae = ae
        self._worker = threading.Thread(target=self._work, name="cxrfusion-listen", daemon=True)
        self._worker.start()
        log.info(
            "listening as %s on %s:%d, accepting %s",
            settings.ae_title,
            settings.host,
            settings.port,
            ", ".join(settings.allowed),
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening, give associations in progress `grace_s` to finish, and stop the
        worker after the instance in hand; what is still waiting stays in the spool."""
        if self._ae is not None:
            self._server.shutdown()  # no new associations
            deadline = time.monotonic() + grace_s
            for assoc in self._ae.active_associations:
                assoc.join(max(0.0, deadline - time.monotonic()))
            self._ae.shutdown()  # aborts what did not finish: the sender sends it again
        self._stop.set()
        if self._worker is not None:
            self._worker.join()

    @property
    def running(self) -> bool:
        """Whether the worker is alive (a bug stops it: see `progress.error`)."""
        return self._worker is not None and self._worker.is_alive()

    def _on_store(self, event: evt.Event) -> int:
        """The association thread's part: check the caller, spool the data, answer."""
        calling = event.assoc.requestor.ae_title
        if calling not in self.settings.allowed:  # the association check already refuses them
            return NOT_AUTHORISED
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if len(uid) > 64 or not _UID.fullmatch(uid):
            log.warning("C-STORE from %s: SOP Instance UID %r is not a UID", calling, uid[:80])
            return CANNOT_UNDERSTAND
        try:
            path = self.spool.write(uid, event.encoded_dataset())
        except OSError as error:
            log.error("spool %s: cannot write %s (%s)", self.spool.folder, uid, error)
            return OUT_OF_RESOURCES
        try:
            self._queue.put_nowait(path)
        except queue.Full:
            self._overflow.set()  # it waits in the spool; the worker looks there next
        return SUCCESS

    def _work(self) -> None:
        try:
            self._drain_spool()  # what an earlier run left, first
            next_pass = time.monotonic() + self.settings.retry_s
            while not self._stop.is_set():
                try:
                    path = self._queue.get(timeout=0.5)  # and look at the stop flag
                except queue.Empty:
                    path = None
                if path is not None:
                    self.handle(path)
                idle_long = path is None and time.monotonic() >= next_pass
                if idle_long or (self._overflow.is_set() and self._queue.empty()):
                    self._overflow.clear()
                    self._drain_spool()  # overflow, and results not sent yet tried again
                    next_pass = time.monotonic() + self.settings.retry_s
        except BaseException as error:  # a bug: stop the command rather than spool forever
            self.progress.error = error
            log.critical("the worker stopped: %s", error, exc_info=True)

    def _drain_spool(self) -> None:
        for path in self.spool.pending():
            if self._stop.is_set():
                return
            self.handle(path)

    def handle(self, path: Path) -> str | None:
        """One spooled file through the model loop; its status (None: nothing to do, the file
        gone or the instance already done). The file is removed once its instance is done."""
        uid = path.name.removesuffix(".dcm")
        if not path.is_file():
            return None  # handled through an earlier queue entry or spool pass
        state = self.intake.state
        status = state.status(uid)
        if status in ("processed", "skipped", "failed"):
            log.info("%s: already %s, not processed again", uid, status)
            self.spool.discard(path)
            self.progress.counts["already done"] += 1
            return None
        start = time.perf_counter()
        try:
            dataset = pydicom.dcmread(path)
            if dataset.get("SOPInstanceUID") != uid:
                raise ValueError("its SOP Instance UID differs from the C-STORE request's")
        except (InvalidDicomError, OSError, ValueError, AttributeError) as error:
            ids = Dataset()
            ids.SOPInstanceUID = uid
            reason = f"not a readable DICOM instance ({error})"
            outcome = self.intake.record(
                uid, "failed", reason, self.intake.processor.audit(ids), start, retry=False
            )
        else:
            steps = Steps(header=lambda: dataset, dataset=lambda: dataset, send=self._send)
            try:
                outcome = self.intake.handle(dataset, steps)
            except Exception as error:  # e.g. a destination refusing our SOP classes: this
                # instance fails for good, the worker goes on (a retry would fail the same way)
                log.error("%s: failed (%s: %s)", uid, type(error).__name__, error)
                reason = f"{type(error).__name__}: {error}"
                audit = self.intake.processor.audit(dataset)
                outcome = self.intake.record(uid, "failed", reason, audit, start, retry=False)
        status = state.status(uid)
        if status == "failed":
            self.spool.set_aside(path)
        elif status != "processing":  # processing: kept for the next attempt
            self.spool.discard(path)
        self.progress.counts[outcome] += 1
        return outcome

    def _c_store(self, results: DicomResults) -> None:
        settings = self.settings
        send([results.sr, results.sc], settings.destination, settings.ae_title, settings.timeout_s)


def _on_rejected(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log.warning(
        "association from %s at %s refused (calling AE title not allowed, or called AE title "
        "not ours)",
        requestor.ae_title,
        requestor.address,
    )
