"""Sealed files: chunked AES-256-GCM with a per-file data key wrapped by a named KEK.

The byte layout is specified in ``docs/sealed-format.md``. In short::

    "FSSEALED" | u8 version=1 | u32 len | header JSON | u32 len | key slot JSON | chunk 0 | chunk 1 | ...

* The header (cipher, chunk size, 8-byte random nonce prefix, 16-byte file id, the file's
  metadata) is immutable and authenticated: ``H = SHA-256("FSSEALED" | version | header)`` is in
  the associated data of every chunk and of the key wrap.
* The key slot holds the KEK id and the data key wrapped with AES-256-GCM under that KEK (AAD:
  ``"fedsecure-wrap-v1" | H | kek_id``). Rotation rewrites only the slot.
* Chunk ``i`` is AES-256-GCM of up to ``chunk_size`` bytes under the data key, nonce
  ``prefix | u32_be(i)``, AAD ``"fedsecure-chunk-v1" | H | u64_be(i) | u8(final)``. Reordering,
  swapping, dropping, appending or truncating chunks, or moving a chunk from another file, fails.

Every failure to authenticate raises :class:`~fedsecure.errors.IntegrityError` naming the file and
nothing else; nothing read from a file that fails is ever returned. Writes are atomic (temporary
file, fsync, rename, fsync of the directory).

This module is the public entry point. Randomness enters sealing in one place, :func:`_fresh_parts`;
everything after it is deterministic (:func:`_seal_from_parts` is that path in memory, for known-answer
tests). The bytes themselves are built in :mod:`fedsecure.crypto.layout`; opening lives in
:mod:`fedsecure.crypto.reader` and is re-exported here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from fedsecure._durable import atomic_file
from fedsecure._durable import fsync_dir as _fsync_dir
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.layout import (
    DATA_KEY_BYTES,
    DEFAULT_CHUNK,
    FILE_ID_BYTES,
    MAGIC,
    MAX_CHUNK,
    MAX_HEADER,
    NONCE_PREFIX_BYTES,
    TAG,
    VERSION,
    WRAP_NONCE_BYTES,
    ChunkEncoder,
    SealParts,
    Sink,
    canonical_json,
    hash_header,
    header_bytes,
    preamble,
    slot_bytes,
    wrap_key,
)
from fedsecure.crypto.reader import (
    SealedInfo,
    authentication_failure,
    inspect,
    open_bytes,
    open_to_file,
    unwrap_data_key,
)

SUFFIX = ".sealed"

__all__ = ["DEFAULT_CHUNK", "MAGIC", "MAX_CHUNK", "MAX_HEADER", "SUFFIX", "TAG", "VERSION", "SealedInfo",
           "SealedWriter", "inspect", "open_bytes", "open_to_file", "rewrap", "seal_bytes", "seal_file"]


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}]; got {chunk_size}")


def _fresh_parts() -> SealParts:
    """Draw the random parts of one new sealed file: the one place where sealing takes randomness."""
    return SealParts(data_key=secrets.token_bytes(DATA_KEY_BYTES), nonce_prefix=secrets.token_bytes(NONCE_PREFIX_BYTES),
                     file_id=secrets.token_bytes(FILE_ID_BYTES), wrap_nonce=secrets.token_bytes(WRAP_NONCE_BYTES))


def _start(ring: KeyRing, metadata: dict[str, str] | None, chunk_size: int, parts: SealParts,
           sink: Sink) -> ChunkEncoder:
    """Pass the header and key slot (under ``ring.current``) to ``sink``; return the encoder for the chunks.

    Deterministic: every sealed byte is a function of the arguments.
    """
    _check_chunk_size(chunk_size)
    hb = header_bytes(chunk_size, parts.nonce_prefix, parts.file_id, metadata)
    h = hash_header(hb)
    slot = wrap_key(ring.get(ring.current), ring.current, parts.data_key, h, parts.wrap_nonce)
    sink(preamble(hb, slot_bytes(slot)))
    return ChunkEncoder(parts.data_key, parts.nonce_prefix, h, chunk_size, sink)


def _seal_from_parts(plaintext: bytes | bytearray | memoryview, ring: KeyRing, metadata: dict[str, str] | None = None,
                     chunk_size: int = DEFAULT_CHUNK, *, data_key: bytes, nonce_prefix: bytes, file_id: bytes,
                     wrap_nonce: bytes) -> bytes:
    """Seal ``plaintext`` in memory with every random input given: the deterministic core of sealing.

    :class:`SealedWriter` (and so :func:`seal_bytes`, :func:`seal_file` and the tensor and ledger
    writers) draws the parts with :func:`_fresh_parts` and runs the same code (:func:`_start`), so the
    bytes here are exactly what those write to disk. For known-answer tests only: fixed parts reused
    for real data would reuse AES-GCM nonces under one key.

    Args:
        plaintext: The bytes to seal.
        ring: The keyring; ``ring.current`` wraps the data key.
        metadata: String-to-string metadata for the header.
        chunk_size: Plaintext bytes per chunk.
        data_key: 32-byte data key.
        nonce_prefix: 8-byte chunk nonce prefix (the header's ``nonce_prefix``).
        file_id: 16-byte file id (the header's ``file_id``).
        wrap_nonce: 12-byte nonce of the key wrap (the slot's ``wrap_nonce``).

    Returns:
        The complete sealed file.
    """
    parts = SealParts(data_key=data_key, nonce_prefix=nonce_prefix, file_id=file_id, wrap_nonce=wrap_nonce)
    out = bytearray()
    encoder = _start(ring, metadata, chunk_size, parts, out.extend)
    encoder.write(plaintext)
    encoder.finish()
    return bytes(out)


class SealedWriter:
    """Stream plaintext in with :meth:`write`; the sealed file appears (atomically, mode 0600) on :meth:`close`.

    Fresh random parts are drawn per file. Used as a context manager, the file is closed on success
    and aborted (nothing appears, the previous file stays) on an exception.

    Args:
        path: Where the sealed file will appear.
        ring: The keyring; ``ring.current`` wraps the data key.
        metadata: String-to-string metadata stored (authenticated, not encrypted) in the header.
        chunk_size: Plaintext bytes per chunk, 1 to 64 MiB.

    Raises:
        ValueError: ``chunk_size`` is out of range.
    """

    def __init__(self, path: str | Path, ring: KeyRing, metadata: dict[str, str] | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        _check_chunk_size(chunk_size)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _atomic_target(self.path)
        f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f: BinaryIO | None = f
        try:
            os.chmod(self._tmp, 0o600)
            self._encoder = _start(ring, metadata, chunk_size, _fresh_parts(), f.write)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add plaintext; full chunks are encrypted and written as they complete."""
        self._encoder.write(data)

    def close(self) -> Path:
        """Seal the final chunk, fsync, and rename the file into place.

        Returns:
            The sealed file's path.
        """
        self._encoder.finish()
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard what was written; any previous file at ``path`` is left as it was."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def seal_bytes(path: str | Path, data: bytes | bytearray | memoryview, ring: KeyRing,
               metadata: dict[str, str] | None = None, chunk_size: int = DEFAULT_CHUNK) -> Path:
    """Seal ``data`` into ``path`` (atomically, mode 0600) under the ring's current KEK.

    Args:
        path: Where the sealed file appears.
        data: The plaintext.
        ring: The keyring; ``ring.current`` wraps the data key.
        metadata: String-to-string metadata stored (authenticated, not encrypted) in the header.
        chunk_size: Plaintext bytes per chunk.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with SealedWriter(path, ring, metadata, chunk_size) as w:
        w.write(data)
    return Path(path)


def seal_file(src: str | Path, dst: str | Path, ring: KeyRing, metadata: dict[str, str] | None = None,
              chunk_size: int = DEFAULT_CHUNK) -> Path:
    """Seal the file ``src`` into ``dst`` chunk by chunk (constant memory).

    Args:
        src: The plaintext file.
        dst: Where the sealed file appears (atomically).
        ring: The keyring; ``ring.current`` wraps the data key.
        metadata: String-to-string metadata for the header.
        chunk_size: Plaintext bytes per chunk.

    Returns:
        ``dst`` as a :class:`~pathlib.Path`.
    """
    with open(src, "rb") as f, SealedWriter(dst, ring, metadata, chunk_size) as w:
        while block := f.read(chunk_size):
            w.write(block)
    return Path(dst)


def rewrap(path: str | Path, ring: KeyRing, new_kek_id: str | None = None) -> bool:
    """Re-wrap the data key under ``new_kek_id`` without touching the data (only the key slot changes).

    Atomic: a crash leaves the old file or the new one, both openable with a ring that holds both
    keys. The new slot's wrap nonce is drawn fresh.

    Args:
        path: The sealed file.
        ring: A keyring holding both the file's KEK and the target.
        new_kek_id: The KEK to wrap under; the ring's current one by default.

    Returns:
        False when the file is already under that key, True when it was re-wrapped.

    Raises:
        IntegrityError: The file fails to authenticate, or its header is not canonical.
        KeyMaterialError: The ring lacks the file's KEK or the target.
    """
    info = inspect(path)
    target = new_kek_id or ring.current
    if info.kek_id == target:
        return False
    data_key = unwrap_data_key(info, ring)
    slot = wrap_key(ring.get(target), target, data_key, info.header_hash, secrets.token_bytes(WRAP_NONCE_BYTES))
    hb = canonical_json(info.header)
    if hash_header(hb) != info.header_hash:  # not canonical: refuse rather than change what is authenticated
        raise authentication_failure(info.path)
    with open(info.path, "rb") as src, atomic_file(info.path) as dst:
        dst.write(preamble(hb, slot_bytes(slot)))
        src.seek(info.data_offset)
        while block := src.read(8 << 20):
            dst.write(block)
    return True
