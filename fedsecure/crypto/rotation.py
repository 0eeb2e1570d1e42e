"""Key rotation: re-wrap every sealed file's data key under a new KEK, without re-encrypting data.

Safe to interrupt and rerun. The keyring records the rotation in progress (``rotating_to``), so a
rerun continues towards the *same* new key instead of minting another; each file is rewritten
atomically (old or new slot, never half), and the keyring keeps the old keys until every file
is done. Only then, and only with ``retire=True``, are the old keys dropped; their ids stay in the
keyring as ``retired``.

A folder may hold files of several keyrings (a simulation's run directory: the coordinator's adapters,
each site's ledger and residuals under ``sites/``, sealed under the sites' own keyrings). Each file's key
slot names its KEK id (no key needed to read it), so every file is first sorted out:

* its KEK is in this keyring: re-wrapped;
* its KEK is one this keyring retired: an error before anything changes (the old key was dropped too
  early; add it back);
* any other KEK: a file of another keyring, skipped and listed (:attr:`RotationResult.skipped`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedsecure.crypto.keys import KEY_BYTES, KeyRing, new_key_id, read_keyring_file, write_keyring_file
from fedsecure.crypto.sealed import SUFFIX, inspect, rewrap
from fedsecure.errors import KeyMaterialError


@dataclass
class RotationResult:
    """What a rotation did.

    Attributes:
        new_key: The id of the KEK every file of this keyring is now wrapped under.
        rewrapped: Files re-wrapped by this run.
        already: Files that were already under ``new_key`` (an earlier, interrupted run did them).
        retired: Ids dropped from the keyring (only with ``retire=True``).
        skipped: Files sealed under a KEK this keyring never held (another keyring's), with that KEK's id.
    """

    new_key: str
    rewrapped: int
    already: int
    retired: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".rotation")


def sealed_files(roots: Iterable[str | Path]) -> list[Path]:
    """Every ``*.sealed`` file under ``roots`` (a root that is a file is taken as is), sorted per root."""
    out: list[Path] = []
    for root in roots:
        r = Path(root)
        out += [r] if r.is_file() else sorted(p for p in r.rglob(f"*{SUFFIX}") if p.is_file())
    return out


def _sort_out(files: list[Path], ring: KeyRing) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(files of this keyring, files of other keyrings, files under a key this keyring retired), with KEK ids."""
    mine: list[Path] = []
    other: list[tuple[Path, str]] = []
    lost: list[tuple[Path, str]] = []
    for f in files:
        kid = inspect(f).kek_id
        if kid in ring.keys:
            mine.append(f)
        else:
            (lost if kid in ring.retired else other).append((f, kid))
    return mine, other, lost


def _listed(files: list[tuple[Path, str]], limit: int = 5) -> str:
    shown = ", ".join(f"{f} (key {kid})" for f, kid in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def rotate(keyring_path: str | Path, roots: Iterable[str | Path], *, retire: bool = False,
           on_file: Callable[[Path], None] | None = None) -> RotationResult:
    """Add a new current KEK (or resume an interrupted rotation) and re-wrap every sealed file of this keyring.

    Args:
        keyring_path: The keyring file (``file`` provider); rewritten with the new key before any file.
        roots: Files or directories holding the sealed files; files of other keyrings among them are skipped.
        retire: After every file of this keyring under ``roots`` is re-wrapped, drop every other key from the
            keyring (their ids are kept as ``retired``); refused while a file under ``roots`` still needs one.
        on_file: Called with each file of this keyring before it is handled (progress).

    Returns:
        The new key's id, the counts and the skipped files.

    Raises:
        KeyMaterialError: A file is sealed under a key this keyring retired (before anything is changed), or
            (``retire``) a file is still sealed under an old key after the pass (the old keys are kept).
    """
    path = Path(keyring_path)
    ring = read_keyring_file(path)
    roots = list(roots)
    mine, skipped, lost = _sort_out(sealed_files(roots), ring)
    if lost:
        raise KeyMaterialError(
            f"{len(lost)} files are sealed under keys this keyring retired: {_listed(lost)}. An earlier "
            "`fedsecure keys rotate --retire` dropped the keys before these files were re-wrapped; nothing was "
            "changed. Fix: add the old key back to the keyring (from a backup), then rerun `fedsecure keys rotate`."
        )
    marker = _marker(path)
    if marker.exists():
        target = json.loads(marker.read_text())["rotating_to"]
        if target not in ring.keys:  # keyring write did not happen: start this rotation over
            marker.unlink()
    if not marker.exists():
        target = new_key_id()
        while target in ring.keys or target in ring.retired:
            target = new_key_id()
        marker.write_text(json.dumps({"rotating_to": target}))
        ring = KeyRing(current=target, keys={**ring.keys, target: secrets.token_bytes(KEY_BYTES)}, retired=ring.retired)
        write_keyring_file(path, ring, force=True)
    rewrapped = already = 0
    for f in mine:
        if on_file:
            on_file(f)
        if rewrap(f, ring, target):
            rewrapped += 1
        else:
            already += 1
    retired: list[str] = []
    if retire:
        # look again: a file sealed under an old key while the rotation ran (a writer holding the old keyring)
        still = [(f, kid) for f in sealed_files(roots) if (kid := inspect(f).kek_id) in ring.keys and kid != target]
        if still:
            raise KeyMaterialError(
                f"re-wrapped {rewrapped} files, but {len(still)} files are still sealed under old keys of this "
                f"keyring: {_listed(still)} (written while the rotation ran?). The old keys are kept. Fix: rerun "
                "`fedsecure keys rotate --retire` once nothing writes with the old keyring."
            )
        retired = sorted(k for k in ring.keys if k != target)
        ring = KeyRing(current=target, keys={target: ring.keys[target]},
                       retired=sorted(set(ring.retired) | set(retired)))
        write_keyring_file(path, ring, force=True)
    marker.unlink(missing_ok=True)
    return RotationResult(target, rewrapped, already, retired, skipped)


def key_usage(roots: Iterable[str | Path]) -> dict[str, int]:
    """How many sealed files under ``roots`` each KEK id wraps (read from the slots; no key needed)."""
    usage: dict[str, int] = {}
    for f in sealed_files(roots):
        kid = inspect(f).kek_id
        usage[kid] = usage.get(kid, 0) + 1
    return usage
