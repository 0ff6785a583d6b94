"""Extracting an NIH image archive: only folders and plain files under `images/`, at most
`MAX_EXTRACT_BYTES`, into a hidden temporary folder renamed into place with a marker inside, so
that a folder without the marker was never finished and a refused archive leaves nothing."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)

MARKER = ".cxrfusion-complete"
MAX_EXTRACT_BYTES = 8 << 30  # per archive: NIH's largest holds < 5 GB; stops a decompression bomb
CHUNK = 1 << 20


class CorruptArchive(CxrError):
    """An archive that is no valid .tar.gz or holds a member other than a folder or plain file
    under `images/` (never half-extracted)."""


def extract_archive(archive: Path, folder: Path, check: str) -> int:
    """Extract into a temporary sibling of `folder`, write the marker, then rename into place."""
    tmp = folder.with_name(f".{folder.name}.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _unpack(archive, tmp)
        images = _count_images(tmp)
        marker = {"archive": archive.name, "bytes": archive.stat().st_size, "check": check}
        (tmp / MARKER).write_text(json.dumps(marker | {"images": images}))
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder from an older tool
        os.replace(tmp, folder)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise CorruptArchive(f"{archive}: corrupt archive ({error})") from None
    except OSError as error:
        raise CxrError(f"{folder}: cannot extract {archive.name} ({error.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else half-extracted
    log.info("extracted %d images from %s", images, archive.name)
    return images


def _unpack(archive: Path, into: Path) -> None:
    """Write the folders and files of `archive` under `into`, refusing any other member.

    Checked here, member by member as the stream comes, rather than by tarfile's `data` filter,
    which a symlink chain escapes on Pythons without the fix for CVE-2025-4517: NIH archives hold
    only `images/*.png`, so nothing else is ever written, and `MAX_EXTRACT_BYTES` stops a bomb.
    """
    total = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            total += member.size
            problem = _unsafe(member) or (
                total > MAX_EXTRACT_BYTES and f"more than {MAX_EXTRACT_BYTES:,} bytes in all"
            )
            if problem:
                raise CorruptArchive(
                    f"{archive}: refused member {member.name!r} ({problem}); NIH archives hold "
                    "only folders and plain files under images/"
                )
            target = into / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(target, "xb") as sink:
                shutil.copyfileobj(source, sink, CHUNK)
        # tarfile stops at the first unreadable header without an error; reading the gzip
        # stream to its end checks every byte against the stream's CRC-32 and length.
        while tar.fileobj.read(CHUNK):
            pass


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be extracted: anything but a folder or plain file under `images/`."""
    if member.issym() or member.islnk():
        return "a link"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        return "a device, fifo or other special file"
    parts = member.name.split("/")
    if parts[0] != "images" or {"", ".", ".."} & set(parts):
        return "outside images/"
    if len(parts) == 1 and not member.isdir():
        return "a file named images"
    return None


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png"))
