"""Masks and integers for secure aggregation: the PRG, the modulus, and packing values in that many bits.

Every value travels modulo ``2^bits``; ``bits`` is sized from the largest honest sum (:func:`modulus_bits`),
so the sum of the sites' integers never wraps. A mask is the AES-256-CTR keystream of a 32-byte seed
(the seed is unique to one use: HKDF binds it to the run, the round and the pair of sites), read as
little-endian 64-bit words reduced modulo ``2^bits``: uniform, since ``2^bits`` divides ``2^64``.
Packing writes each value in exactly ``bits`` bits, little-endian, so a masked vector of ``n``
values is ``ceil(n x bits / 8)`` bytes: never 8 bytes a value.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsecure.errors import SecAggError

MAX_BITS = 62


def modulus_bits(max_abs: int, weight_total: int) -> int:
    """Bits of a modulus that holds every sum of integers ``|x| <= max_abs`` weighted by weights adding up to
    ``weight_total``, without wrapping (sign included).
    """
    if max_abs < 1 or weight_total < 1:
        raise SecAggError(f"cannot size a modulus for max |x| = {max_abs} and total weight {weight_total}")
    bits = math.ceil(math.log2(2 * max_abs * weight_total + 1))
    if bits > MAX_BITS:
        raise SecAggError(f"a sum of values up to {max_abs} weighted by {weight_total} in all needs {bits} bits, "
                          f"more than {MAX_BITS}. Fix: cap the weights (federation.max_site_records) or quantize "
                          "more coarsely")
    return bits


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform values modulo ``2^bits`` (uint64) from the AES-256-CTR keystream of a 32-byte ``seed``."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(enc.update(b"\0" * (8 * n)) + enc.finalize(), "<u8").copy()
    return words & np.uint64((1 << bits) - 1)


def to_ring(x: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers as elements of Z / 2^bits (uint64); each must satisfy ``|x| < 2^(bits - 1)``."""
    x = np.asarray(x, np.int64)
    if x.size and int(np.abs(x).max()) >= 1 << (bits - 1):
        raise SecAggError(f"a value of {int(np.abs(x).max())} does not fit the {bits}-bit modulus")
    return x.astype(np.uint64) & np.uint64((1 << bits) - 1)


def from_ring(y: np.ndarray, bits: int) -> np.ndarray:
    """Elements of Z / 2^bits back to signed integers (the upper half is negative)."""
    y = np.asarray(y, np.uint64) & np.uint64((1 << bits) - 1)
    out = y.astype(np.int64)
    out[y >= np.uint64(1 << (bits - 1))] -= np.int64(1 << (bits - 1)) * 2
    return out


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """``a + b`` modulo ``2^bits``."""
    return (a + b) & np.uint64((1 << bits) - 1)  # uint64 wraps modulo 2^64, a multiple of 2^bits


def sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """``a - b`` modulo ``2^bits``."""
    return (a - b) & np.uint64((1 << bits) - 1)


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` values packed in ``bits`` bits each."""
    return (n * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """``values`` (each below ``2^bits``) in ``bits`` bits each, little-endian: value ``i`` holds stream bits
    ``[i bits, (i + 1) bits)``. Every 64 values fill exactly ``bits`` 64-bit words, so the work is 64 vector
    operations over the blocks, whatever the length.
    """
    v = np.asarray(values, np.uint64).reshape(-1)
    n = v.size
    blocks = -(-n // 64)
    padded = np.zeros(blocks * 64, np.uint64)
    padded[:n] = v
    padded = padded.reshape(blocks, 64)
    words = np.zeros((blocks, bits + 1), np.uint64)
    for j in range(64):
        w, s = divmod(j * bits, 64)
        words[:, w] |= padded[:, j] << np.uint64(s)
        if s + bits > 64:
            words[:, w + 1] |= padded[:, j] >> np.uint64(64 - s)
    return words[:, :bits].astype("<u8").tobytes()[: packed_size(n, bits)]


def unpack(data: bytes, n: int, bits: int, what: str) -> np.ndarray:
    """The ``n`` values of a packed vector; raises SecAggError naming ``what`` where its length is wrong."""
    if len(data) != packed_size(n, bits):
        raise SecAggError(f"{what}: masked vector of {len(data)} bytes, expected {packed_size(n, bits)} "
                          f"({n} values of {bits} bits)")
    blocks = -(-n // 64)
    raw = np.zeros(blocks * bits * 8, np.uint8)
    raw[: len(data)] = np.frombuffer(data, np.uint8)
    spare = n * bits % 8
    if spare and int(raw[len(data) - 1]) >> spare:
        raise SecAggError(f"{what}: masked vector has bits set past its last value")
    words = np.zeros((blocks, bits + 1), np.uint64)
    words[:, :bits] = raw.view("<u8").reshape(blocks, bits)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((blocks, 64), np.uint64)
    for j in range(64):
        w, s = divmod(j * bits, 64)
        col = words[:, w] >> np.uint64(s)
        if s + bits > 64:
            col |= words[:, w + 1] << np.uint64(64 - s)
        out[:, j] = col & mask
    return out.reshape(-1)[:n]
