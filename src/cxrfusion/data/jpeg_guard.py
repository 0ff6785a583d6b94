"""Refuse a JPEG with an absurd number of scans before any pixel is decoded.

A progressive JPEG may hold any number of scans, and libjpeg walks every block of the image once
per scan, empty or not: a 265 KB file claiming 60 MP with 3,000 empty scans takes minutes to
decode. Encoders write few scans (libjpeg's progressive default: 6 for grayscale, 10 for colour),
so `MAX_JPEG_SCANS` refuses only crafted files.
"""

from __future__ import annotations

import io
from pathlib import Path

from cxrfusion.errors import CxrError

MAX_JPEG_SCANS = 100
_SOI = b"\xff\xd8\xff"
_SOS = b"\xff\xda"


def check_jpeg_scans(
    source: bytes | io.BytesIO | Path, name: str | Path, limit: int = MAX_JPEG_SCANS
) -> None:
    """Raise when `source` is a JPEG with more than `limit` start-of-scan markers.

    Entropy-coded data never holds 0xFFDA (an 0xFF there is followed by 0x00 or a restart
    marker), so the count is the scans plus any chance pairs in metadata: never fewer. Other
    formats pass unread beyond their first bytes.

    Args:
        source: the file, or its bytes.
        name: what the message calls the file.
        limit: most scans accepted.

    Raises:
        CxrError: too many scans; the message names the file, the count and the limit.
    """
    data = _contents(source)
    if not data.startswith(_SOI):
        return
    scans = data.count(_SOS)
    if scans > limit:
        raise CxrError(
            f"{name}: JPEG with {scans} scans (the limit is {limit}): refused before decoding"
        )


def _contents(source: bytes | io.BytesIO | Path) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    if isinstance(source, Path):
        return source.read_bytes()
    return bytes(source)
