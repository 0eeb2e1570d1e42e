"""Sealed format version 1 as bytes: constants, canonical header, header hash, AADs, key wrap, chunk encoder.

Nothing in this module touches the filesystem or draws randomness: the same inputs always give the
same bytes. :mod:`fedsecure.crypto.sealed` draws the random parts of each new file (:class:`SealParts`)
and does the I/O. The byte layout is specified in ``docs/sealed-format.md``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecure._durable import canonical_json as _canonical

MAGIC = b"FSSEALED"
VERSION = 1
TAG = 16
DEFAULT_CHUNK = 1 << 20  # 1 MiB
MAX_CHUNK = 64 << 20
MAX_HEADER = 1 << 20
MAX_CHUNKS = 1 << 32  # the nonce counter is a u32
DATA_KEY_BYTES = 32
NONCE_PREFIX_BYTES = 8
FILE_ID_BYTES = 16
WRAP_NONCE_BYTES = 12

Sink = Callable[[bytes], object]
"""Where sealed bytes go, in order: a file's ``write`` or a ``bytearray``'s ``extend``."""


@dataclass(frozen=True, repr=False)
class SealParts:
    """Every random input of one sealed file; with these fixed, sealing is deterministic.

    A writer must draw fresh parts for every file (see ``fedsecure.crypto.sealed._fresh_parts``):
    reusing a data key with the same nonce prefix breaks AES-GCM. ``repr`` is the default object repr
    so the data key never reaches a log.

    Attributes:
        data_key: The 32-byte AES-256-GCM key that encrypts the chunks.
        nonce_prefix: The 8 bytes ``P`` that start every chunk nonce.
        file_id: 16 bytes that make the header, and so ``H``, unique to the file.
        wrap_nonce: The 12-byte nonce of the key wrap.
    """

    data_key: bytes
    nonce_prefix: bytes
    file_id: bytes
    wrap_nonce: bytes

    def __post_init__(self) -> None:
        for name, size in (("data_key", DATA_KEY_BYTES), ("nonce_prefix", NONCE_PREFIX_BYTES),
                           ("file_id", FILE_ID_BYTES), ("wrap_nonce", WRAP_NONCE_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
                raise ValueError(f"{name} must be {size} bytes; got {got}")


def b64(data: bytes) -> str:
    """Standard base64 (with padding) as text, as every base64 field of the format is written."""
    return base64.b64encode(data).decode("ascii")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The canonical header encoding: keys sorted, no spaces, non-ASCII escaped (:mod:`fedsecure._durable`)."""
    return _canonical(obj)


def header_bytes(chunk_size: int, nonce_prefix: bytes, file_id: bytes, metadata: Mapping[str, Any] | None) -> bytes:
    """The header exactly as a writer stores it.

    Args:
        chunk_size: Plaintext bytes per chunk, ``C``.
        nonce_prefix: The 8-byte nonce prefix ``P``.
        file_id: The 16-byte file id.
        metadata: String-to-string metadata; keys and values are converted with ``str``.

    Returns:
        The canonical JSON of the header (:func:`canonical_json`).
    """
    return canonical_json({"cipher": "AES-256-GCM", "chunk_size": chunk_size, "nonce_prefix": b64(nonce_prefix),
                           "file_id": b64(file_id),
                           "metadata": {str(k): str(v) for k, v in (metadata or {}).items()}})


def hash_header(header: bytes) -> bytes:
    """``H = SHA-256("FSSEALED" | version | header bytes as stored)``."""
    return hashlib.sha256(MAGIC + bytes([VERSION]) + header).digest()


def chunk_nonce(nonce_prefix: bytes, index: int) -> bytes:
    """The 12-byte nonce of chunk ``index``: ``P | u32_be(index)``."""
    return nonce_prefix + struct.pack(">I", index)


def chunk_aad(header_hash: bytes, index: int, final: bool) -> bytes:
    """The AAD of chunk ``index``: ``"fedsecure-chunk-v1" | H | u64_be(index) | u8(final)``."""
    return b"fedsecure-chunk-v1" + header_hash + struct.pack(">QB", index, 1 if final else 0)


def wrap_aad(header_hash: bytes, kek_id: str) -> bytes:
    """The AAD of the key wrap: ``"fedsecure-wrap-v1" | H | UTF-8(kek_id)``."""
    return b"fedsecure-wrap-v1" + header_hash + kek_id.encode("utf-8")


def wrap_key(kek: bytes, kek_id: str, data_key: bytes, header_hash: bytes, nonce: bytes) -> dict[str, str]:
    """Wrap ``data_key`` under ``kek`` into a key slot.

    Args:
        kek: The 32-byte key-encryption key.
        kek_id: Its id in the keyring, stored in the slot and bound into the AAD.
        data_key: The file's 32-byte data key.
        header_hash: ``H`` of the file the slot belongs to.
        nonce: A fresh 12-byte nonce; never reuse one under the same KEK.

    Returns:
        The key slot: ``kek_id``, ``wrap_nonce`` and ``wrapped_key`` (base64).
    """
    wrapped = AESGCM(kek).encrypt(nonce, data_key, wrap_aad(header_hash, kek_id))
    return {"kek_id": kek_id, "wrap_nonce": b64(nonce), "wrapped_key": b64(wrapped)}


def slot_bytes(slot: Mapping[str, str]) -> bytes:
    """The key slot as stored: JSON with sorted keys and Python's default ``", "`` and ``": "`` separators."""
    return json.dumps(slot, sort_keys=True).encode()


def preamble(header: bytes, slot: bytes) -> bytes:
    """Everything before the first chunk: ``"FSSEALED" | u8 version | u32 len | header | u32 len | slot``."""
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(header)) + header + struct.pack(">I", len(slot)) + slot


class ChunkEncoder:
    """Split a plaintext stream into chunks and pass each sealed chunk (ciphertext | tag) to a sink, in order.

    At most ``chunk_size + 1`` plaintext bytes are held: a full chunk is sealed only once another byte
    arrives, because only then is it known not to be the final one (the final flag is in its AAD).
    Call :meth:`finish` exactly once to seal the final chunk (empty when the plaintext is empty).

    Args:
        data_key: The file's 32-byte data key.
        nonce_prefix: The file's 8-byte nonce prefix.
        header_hash: ``H`` of the file's header.
        chunk_size: Plaintext bytes per chunk.
        sink: Receives each sealed chunk.
    """

    def __init__(self, data_key: bytes, nonce_prefix: bytes, header_hash: bytes, chunk_size: int, sink: Sink) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}]; got {chunk_size}")
        self._aead = AESGCM(data_key)
        self._prefix = nonce_prefix
        self._h = header_hash
        self._chunk = chunk_size
        self._sink = sink
        self._buf = bytearray()
        self._index = 0
        self._finished = False

    def _emit(self, data: bytes | bytearray | memoryview, final: bool) -> None:
        aad = chunk_aad(self._h, self._index, final)
        self._sink(self._aead.encrypt(chunk_nonce(self._prefix, self._index), bytes(data), aad))
        self._index += 1
        if self._index >= MAX_CHUNKS:
            raise ValueError("file too large for one sealed file (2^32 chunks)")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add plaintext; every chunk known to be non-final is sealed and passed on."""
        if self._finished:
            raise ValueError("write after finish(): the sealed stream is complete")
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self._chunk + 1 - len(self._buf))  # hold one byte past a chunk: is it final?
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) > self._chunk:
                self._emit(memoryview(self._buf)[: self._chunk], final=False)
                del self._buf[: self._chunk]

    def finish(self) -> None:
        """Seal the final chunk (what is buffered, possibly nothing); later writes are refused."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        self._emit(self._buf, final=True)
        self._buf = bytearray()
