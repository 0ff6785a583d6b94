"""Writes that matter go to a temporary name and are renamed into place: a reader never sees half a file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a new empty sibling of `path`; on success it replaces `path`, on error it is removed.

    Its name is random and created exclusively (O_EXCL), so a symlink planted beside `path` in a
    shared folder cannot redirect the write. Unlike `tempfile.mkstemp` (always 0600), it gets the
    mode `open()` would give, from the umask: colleagues still read the reports.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)
