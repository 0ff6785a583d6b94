"""Read one uploaded image from a multipart request: bounded, in memory, its type checked.

The body is counted while it streams in and refused (413) as soon as it passes the limit, and a
body of more than `MAX_PARTS` parts is refused (400) as soon as the next part begins (the parser
bounds each part's headers itself: 8 lines of 4 KB), so a client can never make the service
buffer more than the limit; nothing is written to disk, and the client's file name is only kept
as a display name (its base name, stripped of anything path-like). Messages never echo the
client's field names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

# Room for the multipart framing and small form fields around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
# The file and a few options (heatmap, image): a form of more parts is not from our clients, and
# each part costs memory of its own (355k tiny parts in 20 MB took 176 MB).
MAX_PARTS = 8
# PNG signature, JPEG start-of-image, and the DICOM "DICM" marker after its 128-byte preamble.
_SIGNATURES = (
    ("png", 0, b"\x89PNG\r\n\x1a\n"),
    ("jpeg", 0, b"\xff\xd8\xff"),
    ("dicom", 128, b"DICM"),
)
_SUFFIXES = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "dicom": (".dcm", ".dicom")}
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
_MAX_NAME = 100


@dataclass
class Upload:
    """The uploaded file (`data`, in memory) and the form's other text fields."""

    name: str
    kind: str
    data: bytes
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    def disposition(self) -> dict[bytes, bytes]:
        return parse_options_header(self.headers.get("content-disposition", b""))[1]


async def read_upload(request: Request, max_bytes: int, field_name: str = "file") -> Upload:
    """Parse the request's multipart body and return the file in `field_name`.

    Args:
        request: the incoming request; its body is consumed.
        max_bytes: largest accepted file; the body may exceed it by `MULTIPART_OVERHEAD`.
        field_name: the multipart field that holds the image.

    Raises:
        HTTPException: 415 for a body that is not multipart/form-data or a file that is not
            PNG, JPEG or DICOM; 413 for a body over the limit; 400 for an empty or malformed
            body, more than `MAX_PARTS` parts, or a missing or empty file field.
    """
    limit = max_bytes + MULTIPART_OVERHEAD
    _check_declared_length(request.headers.get("content-length"), limit, max_bytes)
    boundary = _boundary(request.headers.get("content-type", ""), field_name)
    parts = await _parse(request, boundary, limit, max_bytes)
    files = [p for p in parts if p.disposition().get(b"name") == field_name.encode()]
    if not files:
        raise HTTPException(
            400,
            f"no multipart field {field_name!r}: send the image as the form field {field_name!r}",
        )
    upload = files[0]
    name = safe_name(upload.disposition().get(b"filename", b"").decode("utf-8", "replace"))
    if not upload.data:
        raise HTTPException(400, f"{name}: the uploaded file is empty (0 bytes)")
    kind = sniff(bytes(upload.data[:132]))
    if kind is None:
        raise HTTPException(
            415, f"{name}: unsupported file type: not a PNG, JPEG or DICOM image (by its content)"
        )
    fields = {
        _field_name(p): p.data.decode("utf-8", "replace")
        for p in parts
        if p is not upload and b"filename" not in p.disposition()
    }
    return Upload(name=_with_suffix(name, kind), kind=kind, data=bytes(upload.data), fields=fields)


def sniff(head: bytes) -> str | None:
    """The image type by its leading bytes ("png", "jpeg", "dicom"), or None."""
    for kind, offset, signature in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return kind
    return None


def safe_name(filename: str) -> str:
    """A display name from a client's file name: its last path component, tame characters only.

    "../../etc/passwd.png" and "C:\\x\\passwd.png" both become "passwd.png".
    """
    base = PurePosixPath(filename.replace("\\", "/")).name
    base = _UNSAFE.sub("_", base).strip(" .")[-_MAX_NAME:]
    return base or "upload"


def _with_suffix(name: str, kind: str) -> str:
    """Give the name the suffix of its content, so the decoder never guesses from a wrong one."""
    suffixes = _SUFFIXES[kind]
    return name if name.lower().endswith(suffixes) else name + suffixes[0]


def _boundary(content_type: str, field_name: str) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        shown = content_type or "none"
        raise HTTPException(
            415,
            f"unsupported content type {shown!r}: send multipart/form-data with the image "
            f"(PNG, JPEG or DICOM) in the field {field_name!r}",
        )
    return options[b"boundary"]


def _check_declared_length(header: str | None, limit: int, max_bytes: int) -> None:
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        raise HTTPException(400, f"invalid Content-Length header {header!r}") from None
    if declared > limit:
        raise HTTPException(413, _too_large(max_bytes))
    if declared == 0:
        raise HTTPException(400, "empty request body: send the image as multipart field 'file'")


async def _parse(request: Request, boundary: bytes, limit: int, max_bytes: int) -> list[_Part]:
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]

    def begin() -> None:
        if len(parts) == MAX_PARTS:
            raise HTTPException(400, f"too many form fields: at most {MAX_PARTS} are accepted")
        parts.append(_Part())

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        parts[-1].headers[header[0].decode("latin-1").lower()] = header[1]
        header[:] = [b"", b""]

    def part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]
        if len(parts[-1].data) > max_bytes:
            raise HTTPException(413, _too_large(max_bytes))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": part_data,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, _too_large(max_bytes))
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise HTTPException(400, f"malformed multipart body ({error})") from None
    if received == 0:
        raise HTTPException(400, "empty request body: send the image as multipart field 'file'")
    return parts


def _field_name(part: _Part) -> str:
    return part.disposition().get(b"name", b"").decode("utf-8", "replace")


def _too_large(max_bytes: int) -> str:
    return f"upload too large: the limit is {human_size(max_bytes)} per image"


def human_size(n: int) -> str:
    """Bytes as people read them: "20.0 MB", "512 KB"."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
