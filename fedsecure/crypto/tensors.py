"""Tensors at rest: safetensors bytes, streamed into a sealed file and parsed back without extra copies.

The plaintext inside a sealed adapter is an ordinary safetensors file (8-byte little-endian
header length, JSON header, raw little-endian tensor bytes); tests check it loads with the
``safetensors`` library. Writing streams each tensor's buffer straight into the sealer, and
reading decrypts into one buffer that the returned arrays view: never two copies in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK, SealedWriter, open_bytes
from fedsecure.errors import IntegrityError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _header(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        arr = tensors[name]
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} is not supported")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to a multiple of 8
    return struct.pack("<Q", len(raw)) + raw


def seal_tensors(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    ring: KeyRing,
    metadata: dict[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Path:
    """Write ``tensors`` as safetensors into a sealed file, streaming tensor by tensor (no copy of the whole).

    Args:
        path: Where the sealed file appears (atomically).
        tensors: Name to array; dtypes F32, F16, F64, I64, I32, I16, I8, U8 and BOOL.
        ring: The keyring; ``ring.current`` wraps the data key.
        metadata: Stored both in the safetensors ``__metadata__`` and in the sealed header (with
            ``content = "safetensors"``).
        chunk_size: Plaintext bytes per chunk of the sealed file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: A tensor has an unsupported dtype.
    """
    # C-contiguous little-endian; reshape keeps 0-d tensors 0-d (ascontiguousarray makes them 1-d). The annotation
    # states what reshape returns: numpy's stubs pick the 0-d overload for a shape they cannot see.
    arrays: dict[str, np.ndarray] = {
        k: np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).reshape(v.shape) for k, v in tensors.items()
    }
    with SealedWriter(path, ring, {"content": "safetensors", **(metadata or {})}, chunk_size) as w:
        w.write(_header(arrays, metadata))
        for name in sorted(arrays):
            # ndarray.data is the array's own buffer, typed as a memoryview (under Python 3.11 numpy's stubs do
            # not declare ndarray a Buffer); empty arrays are skipped: a view with a 0 in its shape cannot be cast
            w.write(arrays[name].data.cast("B") if arrays[name].nbytes else b"")
    return Path(path)


def open_tensors(path: str | Path, ring: KeyRing) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Open a sealed safetensors file; the arrays are read-only views of one decrypted buffer.

    Args:
        path: The sealed file.
        ring: A keyring holding the file's KEK.

    Returns:
        The tensors by name, and the sealed header's metadata without ``content``.

    Raises:
        IntegrityError: The file fails to authenticate or does not hold a valid safetensors file.
    """
    buf, meta = open_bytes(path, ring)
    return parse_safetensors(buf, str(path)), {k: v for k, v in meta.items() if k != "content"}


def parse_safetensors(buf: bytearray | bytes, source: str) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into read-only arrays that view ``buf`` (no copy).

    Args:
        buf: A whole safetensors file.
        source: Named in the error message.

    Returns:
        The tensors by name (``__metadata__`` is skipped).

    Raises:
        IntegrityError: ``buf`` is not a valid safetensors file of the supported dtypes.
    """
    try:
        (n,) = struct.unpack("<Q", bytes(buf[:8]))
        header = json.loads(bytes(buf[8 : 8 + n]))
        base = 8 + n
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            start, end = spec["data_offsets"]
            dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
            count = int(np.prod(spec["shape"], dtype=np.int64)) if spec["shape"] else 1
            if end - start != count * dtype.itemsize or base + end > len(buf):
                raise ValueError(name)
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=base + start).reshape(spec["shape"])
            arr.flags.writeable = False
            out[name] = arr
        return out
    except (struct.error, ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise IntegrityError(f"{source}: the sealed content is not a valid safetensors file.") from None
