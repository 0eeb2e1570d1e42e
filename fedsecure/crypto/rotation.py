"""Key rotation: re-wrap every sealed file's data key under a new KEK, without re-encrypting data.

Safe to interrupt and rerun. The keyring records the rotation in progress (``rotating_to``), so a
rerun continues towards the *same* new key instead of minting another; each file is rewritten
atomically (old or new slot, never half), and the keyring keeps the old keys until every file
is done. Only then, and only with ``retire=True``, are the old keys dropped.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsecure.crypto.keys import KEY_BYTES, KeyRing, new_key_id, read_keyring_file, write_keyring_file
from fedsecure.crypto.sealed import SUFFIX, inspect, rewrap


@dataclass
class RotationResult:
    """What a rotation did.

    Attributes:
        new_key: The id of the KEK every file is now wrapped under.
        rewrapped: Files re-wrapped by this run.
        already: Files that were already under ``new_key`` (an earlier, interrupted run did them).
        retired: Ids dropped from the keyring (only with ``retire=True``).
    """

    new_key: str
    rewrapped: int
    already: int
    retired: list[str]


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".rotation")


def sealed_files(roots: Iterable[str | Path]) -> list[Path]:
    """Every ``*.sealed`` file under ``roots`` (a root that is a file is taken as is), sorted per root."""
    out: list[Path] = []
    for root in roots:
        r = Path(root)
        out += [r] if r.is_file() else sorted(p for p in r.rglob(f"*{SUFFIX}") if p.is_file())
    return out


def rotate(keyring_path: str | Path, roots: Iterable[str | Path], *, retire: bool = False,
           on_file: Callable[[Path], None] | None = None) -> RotationResult:
    """Add a new current KEK (or resume an interrupted rotation) and re-wrap every sealed file.

    Args:
        keyring_path: The keyring file (``file`` provider); rewritten with the new key before any file.
        roots: Files or directories holding the sealed files.
        retire: After every file is re-wrapped, drop every other key from the keyring.
        on_file: Called with each file before it is handled (progress).

    Returns:
        The new key's id and counts.
    """
    path = Path(keyring_path)
    ring = read_keyring_file(path)
    marker = _marker(path)
    if marker.exists():
        target = json.loads(marker.read_text())["rotating_to"]
        if target not in ring.keys:  # keyring write did not happen: start this rotation over
            marker.unlink()
    if not marker.exists():
        target = new_key_id()
        while target in ring.keys:
            target = new_key_id()
        marker.write_text(json.dumps({"rotating_to": target}))
        ring = KeyRing(current=target, keys={**ring.keys, target: secrets.token_bytes(KEY_BYTES)})
        write_keyring_file(path, ring, force=True)
    rewrapped = already = 0
    for f in sealed_files(roots):
        if on_file:
            on_file(f)
        if rewrap(f, ring, target):
            rewrapped += 1
        else:
            already += 1
    retired: list[str] = []
    if retire:
        retired = sorted(k for k in ring.keys if k != target)
        ring = KeyRing(current=target, keys={target: ring.keys[target]})
        write_keyring_file(path, ring, force=True)
    marker.unlink(missing_ok=True)
    return RotationResult(target, rewrapped, already, retired)


def key_usage(roots: Iterable[str | Path]) -> dict[str, int]:
    """How many sealed files under ``roots`` each KEK id wraps (read from the slots; no key needed)."""
    usage: dict[str, int] = {}
    for f in sealed_files(roots):
        kid = inspect(f).kek_id
        usage[kid] = usage.get(kid, 0) + 1
    return usage
