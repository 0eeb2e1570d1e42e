"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (a 256-bit integer, below the prime) is the constant term of a random polynomial of
degree ``t - 1``; the share of party ``x`` (1 <= x < 2^16) is the polynomial at ``x``. Any ``t``
shares give ``s`` back by Lagrange interpolation at 0; fewer reveal nothing about it. The
coefficients come from :func:`secrets.randbelow` (the OS CSPRNG). The prime is the Mersenne prime
2^521 - 1, so every 256-bit secret is a field element and a share is 66 bytes.

Shares are ``u16 x | 66-byte big-endian value``. :func:`decode_share` refuses any other length, an
``x`` of 0 and a value outside the field; :func:`combine` refuses duplicate ``x``, too few shares
and a result that is not a 256-bit secret (a sign of a wrong share), with the reason.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Mapping

from fedsecure.errors import SecAggError

PRIME = (1 << 521) - 1
VALUE_BYTES = 66
SHARE_BYTES = 2 + VALUE_BYTES
SECRET_BYTES = 32


def split(secret: bytes, xs: Iterable[int], threshold: int) -> dict[int, bytes]:
    """The shares of a 32-byte ``secret`` for the parties ``xs`` (distinct, in [1, 65535]); any ``threshold``
    of them recover it.
    """
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes; got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(0 < x < 1 << 16 for x in xs):
        raise ValueError(f"share points must be distinct and in [1, 65535]; got {xs}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = struct.pack(">H", x) + y.to_bytes(VALUE_BYTES, "big")
    return out


def decode_share(data: bytes, what: str) -> tuple[int, int]:
    """(x, value) of a share; raises SecAggError naming ``what`` when it is malformed."""
    if not isinstance(data, bytes | bytearray) or len(data) != SHARE_BYTES:
        raise SecAggError(f"{what}: malformed share ({len(data) if isinstance(data, bytes | bytearray) else '?'} "
                          f"bytes, expected {SHARE_BYTES})")
    (x,) = struct.unpack_from(">H", data)
    y = int.from_bytes(data[2:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError(f"{what}: malformed share (point {x} or value outside the field)")
    return x, y


def combine(shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    """The secret from at least ``threshold`` shares (keyed by the party that held them; the first
    ``threshold`` are used). Raises SecAggError where there are too few, a point repeats or the result is not
    a 32-byte secret.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{what}: {len(shares)} shares, {threshold} needed")
    points = [decode_share(v, f"{what} (share from {k})") for k, v in list(shares.items())[:threshold]]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SecAggError(f"{what}: two shares at the same point")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise SecAggError(f"{what}: the shares do not combine to a secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")
