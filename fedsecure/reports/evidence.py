"""What the compliance report says about storage and integrity, gathered the same way for both views.

Nothing here ever reads key bytes: a keyring is described by its ids, its current id, its retired ids and the
date its file last changed; a sealed file by its cipher and the id of the key that wraps it (read from its
header, no key needed). A log that fails verification is described as failed, with the verifier's message,
never as fine.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsecure.errors import FedSecureError

SEAL_ALGORITHM = ("AES-256-GCM in authenticated chunks; a fresh data key per file, wrapped (AES-256-GCM) by the "
                  "keyring's current key-encryption key (docs/sealed-format.md)")


def now() -> str:
    """The time, UTC, to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def generated_by() -> dict[str, str]:
    """Who made the report, on which machine, with which build, and when."""
    from fedsecure.attestation.evidence import code_hash
    from fedsecure.reports.mechanisms import library_version

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"at": now(), "user": user, "host": socket.gethostname(), "fedsecure": library_version("fedsecure"),
            "code_hash": code_hash()}


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file (None when it cannot be read)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def keyring_summary(path: Path | None, provider: str) -> dict[str, Any]:
    """A keyring file's key ids (never its bytes), current and retired ids, and when it last changed."""
    out: dict[str, Any] = {"provider": provider, "file": str(path) if path else None}
    if path is None or not path.is_file():
        out["note"] = ("keys come from the environment, a passphrase or a command: ids are in the sealed files"
                       if provider != "file" else "keyring file not found here")
        return out
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        out.update(key_ids=sorted(data.get("keys", {})), current=data.get("current"),
                   retired=list(data.get("retired", [])), last_changed=_mtime(path),
                   mode=oct(path.stat().st_mode & 0o777))
    except (OSError, ValueError, AttributeError) as e:
        out["note"] = f"unreadable: {e}"
    return out


def sealed_files(paths: list[Path]) -> list[dict[str, Any]]:
    """Each sealed file's cipher and wrapping key id (from its header: no key needed, nothing decrypted)."""
    from fedsecure.crypto import inspect

    out = []
    for p in paths:
        try:
            info = inspect(p)
            out.append({"file": p.name, "cipher": str(info.header.get("cipher", "AES-256-GCM")),
                        "kek_id": info.kek_id, "bytes": info.file_size})
        except FedSecureError as e:
            out.append({"file": p.name, "error": str(e)})
    return out


def audit_summary(path: Path) -> dict[str, Any]:
    """Verify an audit log (chain, then recorded heads): the result, its head and entries, or the failure."""
    from fedsecure.audit import verify_anchored

    if not path.is_file():
        return {"file": str(path), "present": False, "verified": False,
                "result": "MISSING: the run has no audit log; nothing it would record can be checked"}
    try:
        verdict = verify_anchored(path)
    except FedSecureError as e:
        return {"file": str(path), "present": True, "verified": False, "result": f"FAILED: {e}"}
    return {"file": str(path), "present": True, "verified": True, "entries": verdict.chain.count,
            "head": verdict.chain.head, "result": verdict.line()}


def audit_events(path: Path, names: set[str]) -> list[dict[str, Any]]:
    """The entries of an audit log whose event is in ``names`` (read as written; verify first)."""
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("event") in names:
                    out.append(entry)
    except OSError:
        return []
    return out


def finite(x: float | None) -> float | None:
    """A number for JSON: None for an unbounded (infinite) ε."""
    return None if x is None or (isinstance(x, float) and (math.isinf(x) or math.isnan(x))) else x


def finding(severity: str, text: str) -> dict[str, str]:
    """One line of the report's findings: error (do not rely on the figures), warning or info."""
    return {"severity": severity, "text": text}
