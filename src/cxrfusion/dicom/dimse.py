"""DICOM networking (DIMSE) with pynetdicom: who is who (AE titles and addresses, checked where a
user gives them) and the C-STORE SCU that sends results to a PACS."""

from __future__ import annotations

import errno
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from cxrfusion.dicom.pipeline import Transient
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)
# PS3.5 6.2: at most 16 characters of the default repertoire, no backslash or control character,
# not only spaces (leading and trailing spaces are not significant).
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_DESTINATION = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)$")
SUCCESS = 0x0000
# Stored, with a warning: elements coerced (B000), not checked (B007) or discarded (B006).
_STORED_WITH_WARNING = frozenset({0xB000, 0xB006, 0xB007})
TIMEOUT_S = 30.0


def check_ae_title(title: str, option: str) -> str:
    """`title` without its padding, if it is a valid AE title; else CxrError naming `option`."""
    stripped = title.strip()
    if not stripped or not _AE_TITLE.match(title) or len(title) > 16:
        raise CxrError(
            f"{option} {title!r}: an AE title is 1 to 16 characters, letters, digits, spaces "
            "and punctuation but no backslash"
        )
    return stripped


def check_port(port: int, option: str = "--port") -> int:
    """`port` if it is a TCP port number (1-65535); else CxrError."""
    if not 1 <= port <= 65535:
        raise CxrError(f"{option} {port}: expected a TCP port from 1 to 65535")
    return port


def check_free(host: str, port: int) -> None:
    """Fail early, before a model is loaded, if (host, port) cannot be listened on.

    Raises:
        CxrError: the port is in use, privileged, or the host is not an address of this machine.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CxrError(f"--host {host}: not an address of this machine ({error})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as error:
            raise CxrError(listen_error(host, port, error)) from None


def listen_error(host: str, port: int, error: OSError) -> str:
    """One line saying why (host, port) cannot be listened on."""
    if isinstance(error, PermissionError):
        return f"--port {port}: not allowed to listen on {host}:{port} (ports below 1024 need privileges)"
    if error.errno == errno.EADDRINUSE:
        return f"--port {port}: {host}:{port} is already in use (another listener or program)"
    return f"--host {host} --port {port}: cannot listen ({error.strerror or error})"


@dataclass(frozen=True)
class Destination:
    """A DICOM node results are sent to.

    Args:
        ae_title: its AE title (the called AE title).
        host: its host name or IP address.
        port: its DICOM port.
    """

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "--send-to")
        check_port(self.port, "--send-to")
        if not self.host:
            raise CxrError("--send-to: the host is empty")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """`AET@HOST:PORT` (an IPv6 address in brackets: `AET@[::1]:104`).

        Raises:
            CxrError: another form, or an invalid AE title or port.
        """
        match = _DESTINATION.match(text)
        if match is None:
            raise CxrError(f"--send-to {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs:4242")
        host = match["host"].strip("[]")
        return cls(match["aet"].strip(), host, int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae: str,
    timeout_s: float = TIMEOUT_S,
) -> None:
    """C-STORE `datasets` to `destination` in one association.

    Args:
        datasets: complete instances (SOP class and instance UIDs, a transfer syntax in their
            file meta, or explicit VR little endian).
        destination: the node.
        calling_ae: our AE title, which the destination may check.
        timeout_s: for the association, each message and the network.

    Raises:
        Transient: the association is refused, aborted or times out, or an instance's status is
            not success: the same objects can be sent again later.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise Transient(f"C-STORE to {destination}: association {what}")
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                raise Transient(f"C-STORE to {destination}: no answer (connection lost or timeout)")
            if code in _STORED_WITH_WARNING:
                log.warning("C-STORE to %s: stored with warning 0x%04X", destination, code)
            elif code != SUCCESS:
                raise Transient(f"C-STORE to {destination}: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
