"""Append-only, hash-chained audit log (JSON lines).

Every security decision the coordinator makes (a nonce issued, evidence accepted or rejected, a
site retired) becomes one line::

    {"seq": 3, "time": "2026-11-27T21:40:02.120Z", "event": "attestation.rejected", ..., "prev": "<hash of line 2>",
     "hash": "<sha256 of this line without 'hash'>"}

The chain makes an edit, a deletion or a reordering in the middle of the file detectable
(:func:`verify_log`, ``fedsecure audit verify``); truncating the tail is detectable only against a
head recorded elsewhere (an *anchor*). A finished run closes its log with a ``run.completed`` entry
and records the head and entry count after it in ``summary.json`` and the coordinator's checkpoint;
the checkpoint after every round records the head at that point. :func:`verify_anchored` compares a
log with those anchors (and with a head the operator holds from elsewhere). Each line is flushed and
fsynced before :meth:`AuditLog.append` returns. The log holds no secrets (no keys, no evidence
bytes: digests only).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure._durable import GENESIS, append_line, canonical_json, chain_hash
from fedsecure.errors import ConfigError, FedSecureError, IntegrityError

#: The last entry of a finished run's log.
RUN_COMPLETED = "run.completed"
#: The audit log's name in a run directory, and the files beside it that record its head.
LOG = "audit.log"
SUMMARY = "summary.json"
CHECKPOINT = "coordinator-state.json"


@dataclass(frozen=True)
class Chain:
    """A verified audit log: the hash of every entry in order, and the last entry's event."""

    path: Path
    hashes: tuple[str, ...]
    last_event: str | None

    @property
    def count(self) -> int:
        """Number of entries."""
        return len(self.hashes)

    @property
    def head(self) -> str:
        """The last entry's hash (:data:`GENESIS` for an empty log)."""
        return self.hashes[-1] if self.hashes else GENESIS

    def hash_at(self, seq: int) -> str | None:
        """The hash of entry ``seq`` (1-based); None past the end."""
        return self.hashes[seq - 1] if 1 <= seq <= self.count else None


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise FedSecureError(f"{p} does not exist. Fix: give the path of a run's audit log "
                             "(runs/<run-id>/audit.log)") from None
    except OSError as e:
        raise FedSecureError(f"{p}: cannot read it ({e.strerror or e}). Fix: give the path of a readable audit "
                             "log file (runs/<run-id>/audit.log)") from None


def read_chain(path: str | Path) -> Chain:
    """Check the whole chain; raises IntegrityError naming the line, FedSecureError when the file cannot be read."""
    p = Path(path)
    prev, seq, hashes, last = GENESIS, 0, [], None
    data = _read_bytes(p)
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
        prev, seq, last = entry["hash"], entry["seq"], str(entry["event"])
        hashes.append(prev)
    return Chain(p, tuple(hashes), last)


def verify_log(path: str | Path) -> tuple[int, str]:
    """Check the whole chain; returns (number of entries, head hash) or raises IntegrityError naming the line."""
    chain = read_chain(path)
    return chain.count, chain.head


def tail(path: str | Path) -> tuple[int, str] | None:
    """(entry count, head) as the log's last line states them, without verifying the chain: what a checkpoint
    records as its anchor. (0, GENESIS) for a missing or empty log; None when the last line is not an entry.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return 0, GENESIS
    lines = data.rstrip(b"\n").rsplit(b"\n", 1)
    if not lines[-1]:
        return 0, GENESIS
    try:
        entry = json.loads(lines[-1])
        return int(entry["seq"]), str(entry["hash"])
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- anchors
@dataclass(frozen=True)
class Anchor:
    """A head of the log recorded apart from it.

    Attributes:
        source: Where it was recorded, for messages (``summary.json``, ``--expect-head``).
        head: The hash of the last entry when it was recorded.
        entries: The entry count then; None when only the head is known (the log must end with it).
        final: Recorded when the run finished: the log must end exactly there.
        closing: The event the log must end with (``run.completed``), when the record says so.
    """

    source: str
    head: str
    entries: int | None = None
    final: bool = True
    closing: str | None = None


_HEX64 = re.compile(r"[0-9a-f]{64}")


def expected_head(head: str, source: str = "--expect-head") -> Anchor:
    """An anchor from a head the operator holds (a signed report, a copy of summary.json): the log must end there.

    Raises:
        ConfigError: ``head`` is not 64 hex digits.
    """
    h = head.strip().lower()
    if not _HEX64.fullmatch(h):
        raise ConfigError(f"{source} {head!r} is not an audit head. Fix: give the full head, 64 hex digits "
                          "(summary.json's attestation.audit_head; summary.md shows only its first 16)")
    return Anchor(source, h)


def _json_beside(log: Path, name: str) -> dict[str, Any] | None:
    p = log.parent / name
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict):
            raise ValueError
        return doc
    except (OSError, ValueError):
        raise IntegrityError(f"{p} cannot be read as JSON, so the audit log beside it cannot be compared with the "
                             "head it records. Fix: restore it from backup, or verify with --expect-head (a head "
                             "recorded elsewhere) or --no-anchor") from None


def _anchor(source: str, head: Any, entries: Any, **kw: Any) -> Anchor:
    if not isinstance(head, str) or not isinstance(entries, int):
        raise IntegrityError(f"{source} records no usable audit head (audit_head {head!r}, audit_entries "
                             f"{entries!r}). Fix: restore it from backup, or verify with --expect-head or --no-anchor")
    return Anchor(source, head, entries, **kw)


def recorded_anchors(log: str | Path) -> list[Anchor]:
    """The heads recorded beside ``log`` in its run directory: ``summary.json`` (the run finished) and the
    coordinator's checkpoint (finished, or after its last completed round). Files written before anchors
    existed give what they hold (an old summary: its head and count; an old checkpoint: nothing).
    """
    p = Path(log)
    out: list[Anchor] = []
    summary = _json_beside(p, SUMMARY)
    if summary is not None:
        att = summary.get("attestation") or {}
        out.append(_anchor(SUMMARY, att.get("audit_head"), att.get("audit_entries"), final=True,
                           closing=att.get("audit_last_event")))
    state = _json_beside(p, CHECKPOINT)
    if state is not None:
        done, audit = state.get("finished"), state.get("audit")
        if isinstance(done, dict):
            out.append(_anchor(CHECKPOINT, done.get("audit_head"), done.get("audit_entries"),
                               final=True, closing=RUN_COMPLETED))
        elif isinstance(audit, dict):
            out.append(_anchor(f"{CHECKPOINT} (after round {state.get('round')})", audit.get("head"),
                               audit.get("entries"), final=False))
    return out


def check_anchor(chain: Chain, anchor: Anchor) -> str:
    """Compare ``chain`` with one anchor; returns what matched (for the OK line) or raises IntegrityError."""
    p, src, n = chain.path, anchor.source, anchor.entries
    ends = f"the log ends at entry {chain.count} (head {chain.head})"
    if n is None:  # a head only: the log must end with it
        if chain.head != anchor.head:
            if anchor.head in chain.hashes:
                at = chain.hashes.index(anchor.head) + 1
                raise IntegrityError(f"{p}: {src} {anchor.head} is entry {at}, but the log goes on to entry "
                                     f"{chain.count}: entries were appended after it")
            raise IntegrityError(f"{p}: {ends}, and no entry has the head {src} gives ({anchor.head}): the log was "
                                 "truncated or replaced. Fix: keep this file as evidence and restore the log from "
                                 "a backup")
        return f"matches {src}"
    if chain.count < n:
        raise IntegrityError(f"{p}: {ends} but {src} records {n} entries with head {anchor.head}: the log was "
                             "truncated or replaced. Fix: keep this file as evidence and restore the log from a "
                             "backup")
    if chain.hash_at(n) != anchor.head:
        raise IntegrityError(f"{p}: entry {n} has hash {chain.hash_at(n)} but {src} records head {anchor.head} "
                             f"at entry {n}: the log was replaced (or {src} was edited)")
    if anchor.final and chain.count > n:
        raise IntegrityError(f"{p}: the log goes on {chain.count - n} entries past the end {src} records "
                             f"(entry {n}): entries were appended after the run finished")
    if anchor.closing and chain.last_event != anchor.closing:
        raise IntegrityError(f"{p}: the last entry is {chain.last_event!r}, but {src} says the run finished, so "
                             f"the log must end with {anchor.closing!r}: the log was truncated or replaced")
    if anchor.final:
        return f"matches {src} ({n} entries)"
    return (f"matches {src} up to entry {n}; the run has not finished, so entries after it have no recorded "
            "head: truncation after it cannot be ruled out")


@dataclass
class Verdict:
    """A log that passed :func:`verify_anchored`: its chain, and what it was compared with."""

    chain: Chain
    matched: list[str] = field(default_factory=list)
    anchored: bool = True  # recorded anchors were looked for

    def line(self) -> str:
        """The one-line report ``fedsecure audit verify`` prints."""
        start = f"OK: {self.chain.count} entries, chain intact, head {self.chain.head}"
        if self.matched:
            return f"{start}; " + "; ".join(self.matched)
        why = "no recorded head to compare with" if self.anchored else "recorded heads not compared (--no-anchor)"
        return f"{start}; {why}: truncation of the tail cannot be ruled out"


def verify_anchored(path: str | Path, *, expect: Anchor | None = None, recorded: bool = True) -> Verdict:
    """Verify the chain, then compare it with the heads recorded beside it (``recorded``) and with ``expect``.

    Raises:
        FedSecureError: The file cannot be read.
        IntegrityError: The chain is broken, or the log is shorter than, longer than or different from a
            recorded head (truncated, extended or replaced).
    """
    chain = read_chain(path)
    anchors = recorded_anchors(chain.path) if recorded else []
    if expect is not None:
        anchors.append(expect)
    return Verdict(chain, [check_anchor(chain, a) for a in anchors], anchored=recorded)


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
        if not self.path.exists():
            return []
        verify_log(self.path)
        return [json.loads(line) for line in self.path.read_text().splitlines()]
