"""Durable files, canonical JSON and hash chains: the one way fedsecure writes what must survive a crash.

- :func:`atomic_write` / :func:`atomic_file`: a crash leaves the old file or the new one, never half of
  one (temporary file beside the target, fsync, rename, fsync of the folder).
- :func:`append_line`: one line appended and fsynced (file and, when it was just created, its folder).
- :func:`canonical_json`: sorted keys, no spaces, ASCII, no NaN or infinity: the bytes every hash and
  signature in fedsecure is computed over.
- :func:`chain_hash` and :data:`GENESIS`: the links of a hash-chained log (the privacy ledger, the
  audit log): each entry carries ``prev`` (the previous entry's hash) and ``hash`` (SHA-256 of its own
  canonical JSON without ``hash``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

#: ``prev`` of the first entry of a hash chain.
GENESIS = "0" * 64


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder."""
    with atomic_file(path, mode) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Stream into a temporary file that replaces ``path`` only if the block finishes without error."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def append_line(path: str | Path, line: bytes, mode: int = 0o600) -> None:
    """Append one line (``line`` ends with a newline) and fsync it before returning."""
    p = Path(path)
    created = not p.exists()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(p.parent)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, ASCII only; NaN and infinity are refused (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def chain_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an entry's canonical JSON without its own ``hash`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()
