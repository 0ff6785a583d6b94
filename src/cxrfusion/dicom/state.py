"""What has been done to each instance, in SQLite: one row per SOP Instance UID, moved by
`advance`, which writes the transition and its audit record in one transaction."""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxrfusion.errors import CxrError

STATUSES = ("processing", "processed", "skipped", "failed")
FINAL = ("processed", "skipped", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    record TEXT NOT NULL
);
"""


class State:
    """The state file of a poller or listener (created on first use).

    Args:
        path: the SQLite file.
        max_attempts: failures after which an instance stays `failed` and is not retried.
    """

    def __init__(self, path: Path, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise CxrError(f"--max-attempts must be >= 1, got {max_attempts}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise CxrError(f"--state {path}: not a usable SQLite file ({error})") from None
        self.max_attempts = max_attempts

    def status(self, uid: str) -> str | None:
        """The instance's status, or None if never seen."""
        row = self._db.execute(
            "SELECT status FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
        return None if row is None else row[0]

    def done(self, uid: str) -> bool:
        """Whether nothing more is to be done for the instance (processed, skipped, failed)."""
        return self.status(uid) in FINAL

    def advance(
        self,
        uid: str,
        to: str,
        reason: str = "",
        model: str = "",
        outputs: tuple[str, ...] = (),
        audit: dict | None = None,
        retry: bool = True,
    ) -> dict:
        """Move an instance to `to` ("failed" counts an attempt and becomes "processing" again
        until `max_attempts`, unless `retry` is False) and store its audit record, when given, in
        the same transaction.

        Returns:
            `audit` plus the status written, the attempts and the time.
        """
        if to not in STATUSES:
            raise ValueError(f"to must be one of {STATUSES}, got {to!r}")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with self._transaction():
            row = self._db.execute(
                "SELECT attempts FROM instances WHERE sop_instance_uid = ?", (uid,)
            ).fetchone()
            attempts = (row[0] if row else 0) + (to == "failed")
            if to == "failed" and retry and attempts < self.max_attempts:
                to = "processing"  # retried on the next pass
            self._db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_instance_uid) "
                "DO UPDATE SET status=excluded.status, reason=excluded.reason, "
                "attempts=excluded.attempts, model=excluded.model, outputs=excluded.outputs, "
                "updated=excluded.updated",
                (uid, to, reason, attempts, model, json.dumps(list(outputs)), now),
            )
            record = {**(audit or {}), "status": to, "attempts": attempts, "time": now}
            if audit is not None:
                self._db.execute(
                    "INSERT INTO audit (sop_instance_uid, record) VALUES (?, ?)",
                    (uid, json.dumps(record, allow_nan=False)),
                )
        return record

    def rows(self) -> list[dict]:
        """Every instance's row, for reports and tests."""
        cursor = self._db.execute("SELECT * FROM instances ORDER BY sop_instance_uid")
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (the connection is in autocommit mode otherwise)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
