"""Append-only, hash-chained audit log (JSON lines).

Every security decision the coordinator makes (a nonce issued, evidence accepted or rejected, a
site retired) becomes one line::

    {"seq": 3, "time": "2026-11-27T21:40:02.120Z", "event": "attestation.rejected", ..., "prev": "<hash of line 2>",
     "hash": "<sha256 of this line without 'hash'>"}

The chain makes an edit, a deletion or a reordering in the middle of the file detectable
(:func:`verify_log`, ``fedsecure audit verify``); truncating the tail is detectable only against a
head recorded elsewhere, which is why the run summary records the head. Each line is flushed and
fsynced before :meth:`AuditLog.append` returns. The log holds no secrets (no keys, no evidence
bytes: digests only).
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from pathlib import Path
from typing import Any

from fedsecure._durable import GENESIS, append_line, canonical_json, chain_hash
from fedsecure.errors import IntegrityError


def verify_log(path: str | Path) -> tuple[int, str]:
    """Check the whole chain; returns (number of entries, head hash) or raises IntegrityError naming the line."""
    p = Path(path)
    prev, seq = GENESIS, 0
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        raise IntegrityError(f"{p}: the last line is incomplete (a write was interrupted, or the file was cut). "
                             "Fix: keep the file as evidence; `fedsecure audit verify` on a backup tells which "
                             "entries are intact.")
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            raise IntegrityError(f"{p}:{lineno}: not a JSON object (the audit log was edited or damaged)") from None
        if not isinstance(entry, dict) or not {"seq", "prev", "hash", "event"} <= entry.keys():
            raise IntegrityError(f"{p}:{lineno}: not an audit entry (fields seq, event, prev, hash expected)")
        if entry["seq"] != seq + 1:
            raise IntegrityError(f"{p}:{lineno}: sequence number {entry['seq']} where {seq + 1} was expected "
                                 "(an entry was removed, duplicated or reordered)")
        if entry["prev"] != prev:
            raise IntegrityError(f"{p}:{lineno}: 'prev' does not match the hash of the previous entry "
                                 "(an earlier entry was changed or removed)")
        if chain_hash(entry) != entry["hash"]:
            raise IntegrityError(f"{p}:{lineno}: the entry's hash does not match its content (it was edited)")
        prev, seq = entry["hash"], entry["seq"]
    return seq, prev


class AuditLog:
    """One audit log file; the existing chain is verified on open and continued."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if self.path.exists():
            self.count, self.head = verify_log(self.path)
        else:
            self.count, self.head = 0, GENESIS

    def append(self, event: str, **fields: Any) -> str:
        """Write one entry (fsynced); returns its hash."""
        with self._lock:
            now = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            entry = {"seq": self.count + 1, "time": now, "event": event, **fields, "prev": self.head}
            entry["hash"] = chain_hash(entry)
            append_line(self.path, canonical_json(entry) + b"\n", mode=0o640)
            self.count, self.head = entry["seq"], entry["hash"]
            return self.head

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, after verifying the chain."""
        verify_log(self.path)
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
