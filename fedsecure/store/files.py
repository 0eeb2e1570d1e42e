"""Sealed or plain: decided once per party, at construction, and used for every file that party writes.

A party (the coordinator, or one site) seals its state with its keyring, or (``storage.seal: false``)
writes it plain. :class:`StateFiles` makes that choice once: every caller names the *plain* path of a
file and gets the sealed form (``<name>.sealed``) or the plain one. A file that exists in the other
form is never ignored (ignoring a sealed ledger while sealing is off would start a fresh budget).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsecure._durable import append_line, atomic_write
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK, SUFFIX, open_bytes, seal_bytes
from fedsecure.crypto.tensors import open_tensors, seal_tensors
from fedsecure.model.adapter import load_adapter_file, save_adapter_file


class StateFiles:
    """The files of one party: sealed under ``ring``, or plain when ``ring`` is None."""

    def __init__(self, ring: KeyRing | None, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.ring = ring
        self.chunk_size = chunk_size

    @property
    def sealed(self) -> bool:
        """Whether this party seals its files."""
        return self.ring is not None

    def path(self, plain: str | Path) -> Path:
        """Where the file named ``plain`` lives in this party's form."""
        p = Path(plain)
        return p.with_name(p.name + SUFFIX) if self.sealed else p

    def other_form(self, plain: str | Path) -> Path:
        """Where the file would live in the other form (sealed while sealing is off, or the reverse)."""
        p = Path(plain)
        return p if self.sealed else p.with_name(p.name + SUFFIX)

    def read_bytes(self, plain: str | Path) -> bytes | None:
        """The file's content (authenticated when sealed), or None when it does not exist."""
        p = self.path(plain)
        if not p.exists():
            return None
        if self.ring is not None:
            return bytes(open_bytes(p, self.ring)[0])
        return p.read_bytes()

    def write_bytes(self, plain: str | Path, data: bytes, metadata: dict[str, str]) -> Path:
        """Replace the file atomically (sealed with ``metadata`` authenticated, or plain)."""
        p = self.path(plain)
        if self.ring is not None:
            return seal_bytes(p, data, self.ring, metadata, self.chunk_size)
        return atomic_write(p, data)

    def append_line(self, plain: str | Path, line: bytes, whole: bytes, metadata: dict[str, str]) -> None:
        """Add ``line`` durably: appended and fsynced when plain; a sealed file is rewritten atomically as
        ``whole`` (its content with the line), since a sealed file is authenticated as one piece.
        """
        if self.ring is not None:
            self.write_bytes(plain, whole, metadata)
        else:
            p = self.path(plain)
            p.parent.mkdir(parents=True, exist_ok=True)
            append_line(p, line)

    def read_tensors(self, plain: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """Tensors and metadata of the file, or None when it does not exist."""
        p = self.path(plain)
        if not p.exists():
            return None
        return open_tensors(p, self.ring) if self.ring is not None else load_adapter_file(p)

    def write_tensors(self, plain: str | Path, state: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
        """Write tensors atomically (sealed safetensors, or plain safetensors)."""
        p = self.path(plain)
        if self.ring is not None:
            return seal_tensors(p, state, self.ring, metadata, self.chunk_size)
        return save_adapter_file(p, state, metadata)
