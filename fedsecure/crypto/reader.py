"""Opening sealed files: parse without a key (:func:`inspect`), then authenticate and decrypt.

Every failure to authenticate raises :class:`~fedsecure.errors.IntegrityError` naming the file and
nothing else; nothing read from a file that fails is ever returned. The byte layout is specified in
``docs/sealed-format.md``; :mod:`fedsecure.crypto.sealed` is the public entry point.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsecure._durable import atomic_file
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.layout import (
    MAGIC,
    MAX_CHUNK,
    MAX_HEADER,
    NONCE_PREFIX_BYTES,
    TAG,
    VERSION,
    chunk_aad,
    chunk_nonce,
    hash_header,
    wrap_aad,
)
from fedsecure.errors import IntegrityError


@dataclass(frozen=True)
class SealedInfo:
    """What can be read from a sealed file without any key (nothing here is authenticated yet).

    Attributes:
        path: The sealed file.
        header: The parsed header JSON.
        slot: The parsed key slot JSON.
        header_hash: ``H``, the SHA-256 that binds the header into the key wrap and every chunk.
        data_offset: Where the first chunk starts.
        file_size: The file's size in bytes.
    """

    path: Path
    header: dict[str, Any]
    slot: dict[str, Any]
    header_hash: bytes
    data_offset: int
    file_size: int

    @property
    def chunk_size(self) -> int:
        """Plaintext bytes per chunk."""
        return int(self.header["chunk_size"])

    @property
    def kek_id(self) -> str:
        """Id of the KEK that wraps the data key."""
        return str(self.slot["kek_id"])

    @property
    def metadata(self) -> dict[str, str]:
        """A copy of the header's metadata."""
        return dict(self.header.get("metadata", {}))

    @property
    def plaintext_size(self) -> int:
        """The plaintext size implied by the file size (negative for a file too short to be valid)."""
        body = self.file_size - self.data_offset
        full = self.chunk_size + TAG
        n_chunks = max(1, -(-body // full))
        return body - n_chunks * TAG


def authentication_failure(path: Path, why: str = "") -> IntegrityError:
    """The one error for a sealed file that fails to parse or authenticate (no detail: no oracle)."""
    return IntegrityError(f"sealed file {path} failed authentication: it was modified, truncated or reordered, or "
                          f"the key that opens it is not the one that sealed it{why}. Nothing was loaded.")


def unwrap_data_key(info: SealedInfo, ring: KeyRing) -> bytes:
    """Unwrap a file's data key with the KEK its slot names.

    Raises:
        IntegrityError: The slot does not authenticate against the header.
        KeyMaterialError: The ring has no key with the slot's ``kek_id``.
    """
    kek = ring.get(info.kek_id)  # KeyMaterialError (clear: which id is missing) if unknown
    try:
        nonce = base64.b64decode(info.slot["wrap_nonce"], validate=True)
        wrapped = base64.b64decode(info.slot["wrapped_key"], validate=True)
        return AESGCM(kek).decrypt(nonce, wrapped, wrap_aad(info.header_hash, info.kek_id))
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise authentication_failure(info.path) from None


def inspect(path: str | Path) -> SealedInfo:
    """Parse the header and key slot of a sealed file (no key needed, nothing decrypted or authenticated).

    Args:
        path: The sealed file.

    Returns:
        Its header, key slot, ``H`` and layout.

    Raises:
        IntegrityError: The file is not a sealed file, has another format version, or its header or
            key slot cannot be parsed.
    """
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
                raise authentication_failure(p)
            hb = f.read(hlen)
            (slen,) = struct.unpack(">I", f.read(4))
            if slen > MAX_HEADER:
                raise authentication_failure(p)
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
        raise authentication_failure(p) from None
    return SealedInfo(p, header, slot, hash_header(hb), offset, size)


def _nonce_prefix(info: SealedInfo) -> bytes:
    prefix = base64.b64decode(info.header["nonce_prefix"])
    if len(prefix) != NONCE_PREFIX_BYTES:
        raise authentication_failure(info.path)
    return prefix


def _chunks(info: SealedInfo, ring: KeyRing) -> Iterator[bytes]:
    aead = AESGCM(unwrap_data_key(info, ring))
    prefix = _nonce_prefix(info)
    full = info.chunk_size + TAG
    with open(info.path, "rb") as f:
        f.seek(info.data_offset)
        index = 0
        block = f.read(full)
        while True:
            nxt = f.read(full)
            final = not nxt
            if len(block) < TAG or (not final and len(block) != full):
                raise authentication_failure(info.path)
            try:
                yield aead.decrypt(chunk_nonce(prefix, index), block, chunk_aad(info.header_hash, index, final))
            except InvalidTag:
                raise authentication_failure(info.path) from None
            if final:
                return
            block, index = nxt, index + 1


def open_bytes(path: str | Path, ring: KeyRing) -> tuple[bytearray, dict[str, str]]:
    """Decrypt a whole sealed file into one buffer, returned only if every chunk authenticates.

    Chunks are read into one reusable block and decrypted straight into the output buffer.

    Args:
        path: The sealed file.
        ring: A keyring holding the file's KEK.

    Returns:
        The plaintext and the header's metadata.

    Raises:
        IntegrityError: Anything in the file fails to parse or authenticate.
        KeyMaterialError: The ring has no key with the file's ``kek_id``.
    """
    info = inspect(path)
    size = info.plaintext_size
    if size < 0:
        raise authentication_failure(info.path)
    out = bytearray(size)
    view = memoryview(out)
    aead = AESGCM(unwrap_data_key(info, ring))
    prefix = _nonce_prefix(info)
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
                raise authentication_failure(info.path)
            plain_len = n - TAG
            if pos + plain_len > size:
                raise authentication_failure(info.path)
            nonce = chunk_nonce(prefix, index)
            aad = chunk_aad(info.header_hash, index, final)
            try:
                if hasattr(aead, "decrypt_into"):  # cryptography >= 45: no intermediate copy
                    aead.decrypt_into(nonce, memoryview(block)[:n], aad, view[pos: pos + plain_len])
                else:  # pragma: no cover - older cryptography
                    view[pos: pos + plain_len] = aead.decrypt(nonce, bytes(block[:n]), aad)
            except (InvalidTag, ValueError):
                raise authentication_failure(info.path) from None
            pos += plain_len
        if f.read(1) or pos != size:
            raise authentication_failure(info.path)
    return out, info.metadata


def open_to_file(src: str | Path, dst: str | Path, ring: KeyRing) -> Path:
    """Decrypt ``src`` chunk by chunk to ``dst``; ``dst`` appears only if the whole file authenticates.

    Args:
        src: The sealed file.
        dst: Where the plaintext appears.
        ring: A keyring holding the file's KEK.

    Returns:
        ``dst`` as a :class:`~pathlib.Path`.

    Raises:
        IntegrityError: Anything in the file fails to parse or authenticate.
        KeyMaterialError: The ring has no key with the file's ``kek_id``.
    """
    info = inspect(src)
    d = Path(dst)
    with atomic_file(d) as f:
        for chunk in _chunks(info, ring):
            f.write(chunk)
    return d
