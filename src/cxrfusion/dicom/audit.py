"""The audit log: one JSON line per instance handled (UIDs, model, thresholds, outcome, timings),
appended and flushed at once. UIDs only: no patient name or ID is ever written here."""

from __future__ import annotations

import json
import os
from pathlib import Path


class AuditLog:
    """Appends records to a JSON-lines file (created with its folder).

    Args:
        path: the log file; None keeps no file (the state's audit table still holds them).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """Append one record as one line, synced to disk."""
        if self.path is None:
            return
        line = json.dumps(record, allow_nan=False, sort_keys=True) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
