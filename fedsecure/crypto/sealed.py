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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecure.crypto.keys import KeyRing
from fedsecure.errors import IntegrityError
from fedsecure.fsutil import atomic_file
from fedsecure.fsutil import fsync_dir as _fsync_dir

MAGIC = b"FSSEALED"
VERSION = 1
TAG = 16
DEFAULT_CHUNK = 1 << 20  # 1 MiB
MAX_CHUNK = 64 << 20
MAX_HEADER = 1 << 20
SUFFIX = ".sealed"


@dataclass(frozen=True)
class SealedInfo:
    """What can be read from a sealed file without any key."""

    path: Path
    header: dict[str, Any]
    slot: dict[str, Any]
    header_hash: bytes
    data_offset: int
    file_size: int

    @property
    def chunk_size(self) -> int:
        return int(self.header["chunk_size"])

    @property
    def kek_id(self) -> str:
        return str(self.slot["kek_id"])

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get("metadata", {}))

    @property
    def plaintext_size(self) -> int:
        body = self.file_size - self.data_offset
        full = self.chunk_size + TAG
        n_chunks = max(1, -(-body // full))
        return body - n_chunks * TAG


def _fail(path: Path, why: str = "") -> IntegrityError:
    return IntegrityError(f"sealed file {path} failed authentication: it was modified, truncated or reordered, or "
                          f"the key that opens it is not the one that sealed it{why}. Nothing was loaded.")


def _hash_header(header_bytes: bytes) -> bytes:
    return hashlib.sha256(MAGIC + bytes([VERSION]) + header_bytes).digest()


def _chunk_aad(h: bytes, index: int, final: bool) -> bytes:
    return b"fedsecure-chunk-v1" + h + struct.pack(">QB", index, 1 if final else 0)


def _wrap_aad(h: bytes, kek_id: str) -> bytes:
    return b"fedsecure-wrap-v1" + h + kek_id.encode("utf-8")


def _wrap(ring: KeyRing, kek_id: str, data_key: bytes, h: bytes) -> dict[str, str]:
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(ring.get(kek_id)).encrypt(nonce, data_key, _wrap_aad(h, kek_id))
    return {"kek_id": kek_id, "wrap_nonce": base64.b64encode(nonce).decode(),
            "wrapped_key": base64.b64encode(wrapped).decode()}


def _unwrap(info: SealedInfo, ring: KeyRing) -> bytes:
    kek = ring.get(info.kek_id)  # KeyMaterialError (clear: which id is missing) if unknown
    try:
        nonce = base64.b64decode(info.slot["wrap_nonce"], validate=True)
        wrapped = base64.b64decode(info.slot["wrapped_key"], validate=True)
        return AESGCM(kek).decrypt(nonce, wrapped, _wrap_aad(info.header_hash, info.kek_id))
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise _fail(info.path) from None


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")




class SealedWriter:
    """Stream plaintext in with :meth:`write`; the file appears (atomically) on :meth:`close`."""

    def __init__(self, path: str | Path, ring: KeyRing, metadata: dict[str, str] | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}]; got {chunk_size}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _atomic_target(self.path)
        self._f: BinaryIO | None = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        os.chmod(self._tmp, 0o600)
        self._key = secrets.token_bytes(32)
        self._aead = AESGCM(self._key)
        self._prefix = secrets.token_bytes(8)
        self._chunk = chunk_size
        header = {"cipher": "AES-256-GCM", "chunk_size": chunk_size,
                  "nonce_prefix": base64.b64encode(self._prefix).decode(),
                  "file_id": base64.b64encode(secrets.token_bytes(16)).decode(),
                  "metadata": {str(k): str(v) for k, v in (metadata or {}).items()}}
        hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        self._h = _hash_header(hb)
        slot = json.dumps(_wrap(ring, ring.current, self._key, self._h), sort_keys=True).encode()
        self._f.write(MAGIC + bytes([VERSION]) + struct.pack(">I", len(hb)) + hb + struct.pack(">I", len(slot)) + slot)
        self._buf = bytearray()
        self._index = 0

    def _emit(self, data: bytes | bytearray | memoryview, final: bool) -> None:
        nonce = self._prefix + struct.pack(">I", self._index)
        assert self._f is not None
        self._f.write(self._aead.encrypt(nonce, bytes(data), _chunk_aad(self._h, self._index, final)))
        self._index += 1
        if self._index >= 2**32:
            raise ValueError("file too large for one sealed file (2^32 chunks)")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self._chunk + 1 - len(self._buf))  # hold one byte past a chunk: is it final?
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) > self._chunk:
                self._emit(memoryview(self._buf)[: self._chunk], final=False)
                del self._buf[: self._chunk]

    def close(self) -> Path:
        self._emit(self._buf, final=True)
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def inspect(path: str | Path) -> SealedInfo:
    """Parse the header and key slot (no key needed, nothing decrypted)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise IntegrityError(f"{p} is not a sealed fedsecure file (bad magic). Fix: pass a *.sealed file.")
            version = f.read(1)
            if version != bytes([VERSION]):
                raise IntegrityError(f"{p}: sealed format version {version[0] if version else '?'} is not "
                                     f"supported (this fedsecure reads {VERSION}).")
            (hlen,) = struct.unpack(">I", f.read(4))
            if hlen > MAX_HEADER:
                raise _fail(p)
            hb = f.read(hlen)
            (slen,) = struct.unpack(">I", f.read(4))
            if slen > MAX_HEADER:
                raise _fail(p)
            sb = f.read(slen)
            offset = f.tell()
        header, slot = json.loads(hb), json.loads(sb)
        if not isinstance(header, dict) or not isinstance(slot, dict):
            raise ValueError("header")
        chunk = int(header["chunk_size"])
        if not 1 <= chunk <= MAX_CHUNK or header.get("cipher") != "AES-256-GCM":
            raise ValueError("chunk")
        base64.b64decode(header["nonce_prefix"], validate=True)
        if not isinstance(header.get("metadata", {}), dict) or not all(
                isinstance(slot.get(k), str) for k in ("kek_id", "wrap_nonce", "wrapped_key")):
            raise ValueError("slot")
    except IntegrityError:
        raise
    except (OSError, struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _fail(p) from None
    return SealedInfo(p, header, slot, _hash_header(hb), offset, size)


def _chunks(info: SealedInfo, ring: KeyRing) -> Iterator[bytes]:
    key = _unwrap(info, ring)
    aead = AESGCM(key)
    prefix = base64.b64decode(info.header["nonce_prefix"])
    if len(prefix) != 8:
        raise _fail(info.path)
    full = info.chunk_size + TAG
    with open(info.path, "rb") as f:
        f.seek(info.data_offset)
        index = 0
        block = f.read(full)
        while True:
            nxt = f.read(full)
            final = not nxt
            if len(block) < TAG or (not final and len(block) != full):
                raise _fail(info.path)
            try:
                yield aead.decrypt(prefix + struct.pack(">I", index), block, _chunk_aad(info.header_hash, index, final))
            except InvalidTag:
                raise _fail(info.path) from None
            if final:
                return
            block, index = nxt, index + 1


def open_bytes(path: str | Path, ring: KeyRing) -> tuple[bytearray, dict[str, str]]:
    """Decrypt a whole sealed file into one buffer (returned only if every chunk authenticates).

    Chunks are read into one reusable block and decrypted straight into the output buffer.
    """
    info = inspect(path)
    size = info.plaintext_size
    if size < 0:
        raise _fail(info.path)
    out = bytearray(size)
    view = memoryview(out)
    aead = AESGCM(_unwrap(info, ring))
    prefix = base64.b64decode(info.header["nonce_prefix"])
    if len(prefix) != 8:
        raise _fail(info.path)
    full = info.chunk_size + TAG
    body = info.file_size - info.data_offset
    n_chunks = max(1, -(-body // full))
    block = bytearray(full)
    pos = 0
    with open(info.path, "rb") as f:
        f.seek(info.data_offset)
        for index in range(n_chunks):
            final = index == n_chunks - 1
            n = f.readinto(block)
            if n < TAG or (not final and n != full):
                raise _fail(info.path)
            plain_len = n - TAG
            if pos + plain_len > size:
                raise _fail(info.path)
            nonce = prefix + struct.pack(">I", index)
            aad = _chunk_aad(info.header_hash, index, final)
            try:
                if hasattr(aead, "decrypt_into"):  # cryptography >= 45: no intermediate copy
                    aead.decrypt_into(nonce, memoryview(block)[:n], aad, view[pos: pos + plain_len])
                else:  # pragma: no cover - older cryptography
                    view[pos: pos + plain_len] = aead.decrypt(nonce, bytes(block[:n]), aad)
            except (InvalidTag, ValueError):
                raise _fail(info.path) from None
            pos += plain_len
        if f.read(1) or pos != size:
            raise _fail(info.path)
    return out, info.metadata


def seal_bytes(path: str | Path, data: bytes | bytearray | memoryview, ring: KeyRing,
               metadata: dict[str, str] | None = None, chunk_size: int = DEFAULT_CHUNK) -> Path:
    with SealedWriter(path, ring, metadata, chunk_size) as w:
        w.write(data)
    return Path(path)


def seal_file(src: str | Path, dst: str | Path, ring: KeyRing, metadata: dict[str, str] | None = None,
              chunk_size: int = DEFAULT_CHUNK) -> Path:
    """Seal a file chunk by chunk (constant memory)."""
    with open(src, "rb") as f, SealedWriter(dst, ring, metadata, chunk_size) as w:
        while block := f.read(chunk_size):
            w.write(block)
    return Path(dst)


def open_to_file(src: str | Path, dst: str | Path, ring: KeyRing) -> Path:
    """Decrypt chunk by chunk to ``dst``; ``dst`` appears only if the whole file authenticates."""
    info = inspect(src)
    d = Path(dst)
    with atomic_file(d) as f:
        for chunk in _chunks(info, ring):
            f.write(chunk)
    return d


def rewrap(path: str | Path, ring: KeyRing, new_kek_id: str | None = None) -> bool:
    """Re-wrap the data key under ``new_kek_id`` (default: the ring's current) without touching the data.

    Returns False when the file is already under that key. Atomic: a crash leaves the old file or
    the new one, both openable with a ring that holds both keys.
    """
    info = inspect(path)
    target = new_kek_id or ring.current
    if info.kek_id == target:
        return False
    data_key = _unwrap(info, ring)
    slot = json.dumps(_wrap(ring, target, data_key, info.header_hash), sort_keys=True).encode()
    hb = json.dumps(info.header, sort_keys=True, separators=(",", ":")).encode()
    if _hash_header(hb) != info.header_hash:
        raise _fail(info.path)  # the header is not canonical: refuse rather than change what is authenticated
    with open(info.path, "rb") as src, atomic_file(info.path) as dst:
        dst.write(MAGIC + bytes([VERSION]) + struct.pack(">I", len(hb)) + hb + struct.pack(">I", len(slot)) + slot)
        src.seek(info.data_offset)
        while block := src.read(8 << 20):
            dst.write(block)
    return True
