"""The codec's stages: one class per value encoding, the sparse (top-k) index coding, and their registry.

A :class:`Stage` turns the ``k`` kept values of one tensor into the value part of its section and
back; :mod:`fedsecure.transport.codec` owns the wire format around it (table, framing, caps) and
loops over the tensors. Each stage knows its wire code (the table's ``enc`` byte), its policy name
(:attr:`TensorRule.enc <fedsecure.config.run.TensorRule.enc>`), how many bytes ``k`` values
take at least and at most, and how to check and decode its bytes without trusting them.

Adding an encoding is one new :class:`Stage` subclass and one :func:`register` line.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import numpy as np

from fedsecure.errors import UpdateRejected

if TYPE_CHECKING:
    from fedsecure.config.run import TensorRule

BLOCK = 64
KMAX = 7  # dithered codes lie in [-KMAX, KMAX]
_DQ_HEAD = struct.Struct("<fB")  # a dithered section's step and code range K


# ----------------------------------------------------------------------------- blockwise quantization
def quantize(x: np.ndarray, levels: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric quantization of a flat float32 vector; returns (int8 codes, float32 scales).

    With ``rng`` the rounding is stochastic (unbiased); without, to nearest.
    """
    n = x.size
    nb = -(-n // BLOCK)
    padded = np.zeros(nb * BLOCK, np.float32)
    padded[:n] = x
    blocks = padded.reshape(nb, BLOCK)
    scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    y = blocks / safe[:, None]
    if rng is not None:
        q = np.floor(y + rng.random(y.shape, dtype=np.float32))
    else:
        q = np.rint(y)
    q = np.clip(q, -levels, levels).astype(np.int8).reshape(-1)[:n]
    return q, scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 values of blockwise codes ``q`` with one scale per block of :data:`BLOCK`."""
    n = q.size
    nb = scales.size
    padded = np.zeros(nb * BLOCK, np.float32)
    padded[:n] = q.astype(np.float32)
    return (padded.reshape(nb, BLOCK) * scales[:, None]).reshape(-1)[:n]


def _pack4(q: np.ndarray) -> bytes:
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # -7..7 -> 1..15
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return ((u[0::2] << 4) | u[1::2]).astype(np.uint8).tobytes()


def _unpack4(b: bytes, n: int) -> np.ndarray:
    u = np.frombuffer(b, np.uint8)
    out = np.empty(u.size * 2, np.int16)
    out[0::2], out[1::2] = u >> 4, u & 0x0F
    return (out[:n] - 8).astype(np.int8)


# ----------------------------------------------------------------------------- dithered quantization
def _per_byte(K: int) -> int:
    """How many base-(2K+1) codes fit in one byte (0 when K = 0: no code bytes at all)."""
    return 0 if K == 0 else int(math.floor(math.log(256) / math.log(2 * K + 1) + 1e-9))


def _dq_bytes(k: int, K: int) -> int:
    per = _per_byte(K)
    return 5 + (0 if per == 0 else -(-k // per))


def dither_stream(seed: int, n: int) -> np.ndarray:
    """``n`` dither values (float32), uniform on [-1/2, 1/2) in steps of 2^-24: two per 64-bit output
    of PCG64 (high 24 bits first, then bits 8..31). PCG64's raw stream is fixed by NumPy's stream
    compatibility policy for bit generators; a known-answer test pins it.
    """
    if n == 0:
        return np.zeros(0, np.float32)
    raw = np.random.PCG64(seed).random_raw((n + 1) // 2)
    u = np.empty(2 * raw.size, np.uint32)
    u[0::2] = (raw >> np.uint64(40)).astype(np.uint32)
    u[1::2] = ((raw >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.uint32)
    out = u[:n].astype(np.float32)
    out *= np.float32(2.0 ** -24)
    out -= np.float32(0.5)
    return out


def dither_quantize(x: np.ndarray, step_rms: float, u: np.ndarray | None) -> tuple[np.float32, int, np.ndarray]:
    """(step, K, codes) of a flat float32 vector; ``u`` = the dither (None: round to nearest)."""
    x = np.asarray(x, np.float32)
    amax = float(np.abs(x).max()) if x.size else 0.0
    if amax == 0.0:
        return np.float32(0.0), 0, np.zeros(x.size, np.int8)
    rms = float(np.linalg.norm(x)) / math.sqrt(x.size)
    step = np.float32(max(step_rms * rms, amax / (KMAX - 0.5)))
    y = x / step
    if u is not None:
        y += u
    np.rint(y, out=y)
    np.clip(y, -KMAX, KMAX, out=y)  # |y| <= 7 by the choice of step; the clip is a guard
    q = y.astype(np.int8)
    return step, int(np.abs(q).max()), q


def dither_dequantize(step: np.float32, q: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """The values ``(q - u) * step`` the receiver reconstructs (``u`` None: no dither)."""
    if step == 0:
        return np.zeros(q.size, np.float32)
    out = q.astype(np.float32)
    if u is not None:
        out -= u
    out *= np.float32(step)
    return out


def _pack_base(codes: np.ndarray, K: int) -> bytes:
    per = _per_byte(K)
    if per == 0:
        return b""
    base = 2 * K + 1
    c = (codes + np.int8(K)).astype(np.uint8)
    pad = (-c.size) % per
    if pad:
        c = np.concatenate([c, np.zeros(pad, np.uint8)])
    c = c.reshape(-1, per)
    acc = c[:, per - 1].astype(np.uint8)
    for j in range(per - 2, -1, -1):  # Horner: code j is digit j (base^j)
        acc = acc * np.uint8(base) + c[:, j]
    return acc.tobytes()


def _digit_table(K: int) -> np.ndarray:
    """(256, per) int8: the codes q (digit - K) each byte value stands for."""
    per, base = _per_byte(K), 2 * K + 1
    v = np.arange(256)
    return np.stack([(v // base ** j) % base - K for j in range(per)], axis=1).astype(np.int8)


_DIGITS = {K: _digit_table(K) for K in range(1, KMAX + 1)}


def _unpack_base(b: bytes, k: int, K: int, name: str) -> np.ndarray:
    per = _per_byte(K)
    if per == 0:
        return np.zeros(k, np.int8)
    v = np.frombuffer(b, np.uint8)
    if v.size and int(v.max()) >= (2 * K + 1) ** per:
        raise UpdateRejected(f"tensor {name}: packed code out of range")
    return _DIGITS[K][v].reshape(-1)[:k]


# ----------------------------------------------------------------------------- stages
class Randomness:
    """One end's randomness, consumed in table order: a Generator for stochastic rounding, and the dither stream.

    Args:
        rng: the sender's rounding randomness (None: round to nearest, and always None at the receiver).
        dither: the whole dither stream of the payload (None: no dither).
    """

    def __init__(self, rng: np.random.Generator | None, dither: np.ndarray | None) -> None:
        self.rng, self._dither, self._pos = rng, dither, 0

    def dither(self, k: int) -> np.ndarray | None:
        """The next ``k`` dither values (None without dither)."""
        if self._dither is None:
            return None
        u = self._dither[self._pos: self._pos + k]
        self._pos += k
        return u


class Stage:
    """One value encoding: how ``k`` kept values of a tensor become bytes and, strictly checked, come back.

    Attributes:
        code: the wire code (the table's ``enc`` byte, below 0x80).
        name: the policy name (:attr:`TensorRule.enc <fedsecure.config.run.TensorRule.enc>`).
        dithered: whether the stage consumes ``k`` values of the payload's dither stream.
    """

    code: int
    name: str
    dithered: bool = False

    def min_bytes(self, k: int) -> int:
        """Fewest bytes the values of ``k`` entries can take."""
        raise NotImplementedError

    def max_bytes(self, k: int) -> int:
        """Most bytes the values of ``k`` entries can take."""
        return self.min_bytes(k)

    def dense_bytes(self, body: bytes, pos: int, k: int) -> int:
        """Size of a dense section of ``k`` values starting at ``body[pos]`` (unchecked; decode checks it)."""
        return self.min_bytes(k)

    def encode(self, vals: np.ndarray, rule: TensorRule, rand: Randomness) -> tuple[list[bytes], np.ndarray]:
        """The value bytes of a flat float32 vector, and the values the receiver will reconstruct."""
        raise NotImplementedError

    def decode(self, sec: bytes, off: int, k: int, name: str, rand: Randomness) -> np.ndarray:
        """The ``k`` values in ``sec[off:]`` (which must be exactly their bytes); raises UpdateRejected."""
        raise NotImplementedError

    def _check_size(self, sec: bytes, off: int, k: int, name: str) -> None:
        if len(sec) - off != self.min_bytes(k):
            raise UpdateRejected(f"tensor {name}: section of {len(sec)} bytes does not match {k} {self.name} values")


class Float32(Stage):
    """The values as little-endian float32: exact."""

    code, name = 0, "f32"

    def min_bytes(self, k: int) -> int:
        """Four bytes a value."""
        return 4 * k

    def encode(self, vals: np.ndarray, rule: TensorRule, rand: Randomness) -> tuple[list[bytes], np.ndarray]:
        """The values' bytes; the receiver gets them exactly."""
        return [vals.astype("<f4").tobytes()], vals.astype(np.float32)

    def decode(self, sec: bytes, off: int, k: int, name: str, rand: Randomness) -> np.ndarray:
        """The float32 values (finiteness is the driver's check)."""
        self._check_size(sec, off, k, name)
        return np.frombuffer(sec, "<f4", count=k, offset=off).astype(np.float32)


class Blockwise(Stage):
    """Blockwise symmetric quantization: one float32 scale per :data:`BLOCK` values, then the codes
    in ``[-levels, levels]`` (int8: one a byte, ``levels`` 127; int4: two a byte, ``levels`` 7). Rounding
    is stochastic (unbiased) with the sender's Generator, else to nearest.

    Args:
        code: the wire code.
        name: the policy name.
        bits: 8 or 4.
    """

    def __init__(self, code: int, name: str, bits: int) -> None:
        if bits not in (8, 4):
            raise ValueError(f"blockwise codes are 8 or 4 bits; got {bits}")
        self.code, self.name, self.bits, self.levels = code, name, bits, 127 if bits == 8 else 7

    def min_bytes(self, k: int) -> int:
        """The scales (four bytes a block) and the codes."""
        return 4 * -(-k // BLOCK) + (k if self.bits == 8 else (k + 1) // 2)

    def encode(self, vals: np.ndarray, rule: TensorRule, rand: Randomness) -> tuple[list[bytes], np.ndarray]:
        """Scales then codes; the receiver gets ``code x scale``."""
        q, scales = quantize(vals, self.levels, rand.rng)
        return [scales.astype("<f4").tobytes(), q.tobytes() if self.bits == 8 else _pack4(q)], dequantize(q, scales)

    def decode(self, sec: bytes, off: int, k: int, name: str, rand: Randomness) -> np.ndarray:
        """Checks the size, that scales are finite and non-negative, and codes in range."""
        self._check_size(sec, off, k, name)
        nb = -(-k // BLOCK)
        scales = np.frombuffer(sec, "<f4", count=nb, offset=off).astype(np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise UpdateRejected(f"tensor {name}: non-finite or negative scales")
        off += 4 * nb
        q = np.frombuffer(sec, np.int8, count=k, offset=off) if self.bits == 8 else _unpack4(sec[off:], k)
        if np.any(q < -self.levels):  # int8: -128, int4: -8; no code can exceed +levels
            raise UpdateRejected(f"tensor {name}: code out of range")
        return dequantize(q, scales)


class Dithered(Stage):
    """Subtractive dithered quantization: ``f32 step | u8 K``, then the codes ``q + K`` in ``[0, 2K]``
    packed in base ``2K + 1``, as many a byte as fit. The step is the rule's ``dither`` x the RMS
    (raised so that ``|q| <= KMAX``); the dither is the payload's stream, consumed in table order.
    """

    code, name, dithered = 3, "dq-packed", True

    def min_bytes(self, k: int) -> int:
        """The header alone (an all-zero tensor: step 0, no codes)."""
        return _DQ_HEAD.size

    def max_bytes(self, k: int) -> int:
        """The header and the codes at the widest code range, ``K = KMAX``."""
        return _dq_bytes(k, KMAX)

    def dense_bytes(self, body: bytes, pos: int, k: int) -> int:
        """The code range ``K`` in the section's header sets its size (5 where the header is invalid)."""
        if pos + _DQ_HEAD.size > len(body):
            return _DQ_HEAD.size
        step, K = _DQ_HEAD.unpack_from(body, pos)
        return _dq_bytes(k, K) if step != 0 and K <= KMAX else _DQ_HEAD.size

    def encode(self, vals: np.ndarray, rule: TensorRule, rand: Randomness) -> tuple[list[bytes], np.ndarray]:
        """Header then packed codes; the receiver gets ``(q - u) x step``."""
        u = rand.dither(vals.size)
        step, K, q = dither_quantize(vals, rule.dither, u)
        parts = [_DQ_HEAD.pack(float(step), K), _pack_base(q, K) if step != 0 else b""]
        return parts, dither_dequantize(step, q, u)

    def decode(self, sec: bytes, off: int, k: int, name: str, rand: Randomness) -> np.ndarray:
        """Checks the step (finite, >= 0), the code range, the size and every packed byte."""
        step, K = _DQ_HEAD.unpack_from(sec, off)
        if not (math.isfinite(step) and step >= 0) or K > KMAX or (step == 0 and K != 0):
            raise UpdateRejected(f"tensor {name}: invalid dither step {step} or code range {K}")
        want = _dq_bytes(k, K) if step != 0 else _DQ_HEAD.size
        if len(sec) - off != want:
            raise UpdateRejected(f"tensor {name}: dithered section of {len(sec) - off} bytes, expected {want}")
        u = rand.dither(k)
        q = _unpack_base(sec[off + _DQ_HEAD.size:], k, K, name) if step != 0 else np.zeros(k, np.int8)
        return dither_dequantize(np.float32(step), q, u)


# ----------------------------------------------------------------------------- sparse indices
class TopKGaps:
    """A sparse section's indices: ``u32 e``, the ``k`` gaps between sorted kept indices as bytes
    (255 = escape), then the ``e`` escaped gaps as little-endian u32.
    """

    @staticmethod
    def select(flat: np.ndarray, k: int) -> np.ndarray:
        """The sorted indices of the ``k`` largest magnitudes; ties at the cut go to the lowest indices (our rule,
        not ``argpartition``'s, whose choice changed between NumPy releases: same tensor, same bytes).
        """
        if k >= flat.size:
            return np.arange(flat.size, dtype=np.int64)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        mag = np.abs(flat)
        cut = mag[np.argpartition(mag, flat.size - k)[flat.size - k]]  # the k-th largest magnitude
        above = np.flatnonzero(mag > cut)
        at = np.flatnonzero(mag == cut)[: k - above.size]
        return np.sort(np.concatenate([above, at])).astype(np.int64)

    @staticmethod
    def max_bytes(k: int) -> int:
        """The most bytes ``k`` indices take: every gap escaped."""
        return 4 + 5 * k

    @staticmethod
    def encode(idx: np.ndarray) -> list[bytes]:
        """The index part of a section for sorted, distinct ``idx``."""
        gaps = np.diff(idx, prepend=-1).astype(np.int64)  # first gap = idx[0] + 1 >= 1
        escaped = gaps >= 255
        small = np.where(escaped, 255, gaps).astype(np.uint8)
        return [struct.pack("<I", int(escaped.sum())), small.tobytes(), gaps[escaped].astype("<u4").tobytes()]

    @staticmethod
    def decode(sec: bytes, k: int, numel: int, value_bytes: int, name: str) -> tuple[np.ndarray, int]:
        """(indices, offset of the values) of a section whose values take at least ``value_bytes``.

        Indices must add up, be strictly increasing and below ``numel``; raises UpdateRejected.
        """
        (n_esc,) = struct.unpack("<I", sec[:4])
        if n_esc > k or len(sec) < 4 + k + 4 * n_esc + value_bytes:
            raise UpdateRejected(f"tensor {name}: index section does not add up")
        small = np.frombuffer(sec, np.uint8, count=k, offset=4).astype(np.int64)
        escaped = small == 255
        if int(escaped.sum()) != n_esc:
            raise UpdateRejected(f"tensor {name}: escape count does not match")
        gaps = small.copy()
        gaps[escaped] = np.frombuffer(sec, "<u4", count=n_esc, offset=4 + k).astype(np.int64)
        if gaps.size and gaps.min() < 1:
            raise UpdateRejected(f"tensor {name}: indices are not strictly increasing")
        indices = np.cumsum(gaps) - 1
        if indices[-1] >= numel:
            raise UpdateRejected(f"tensor {name}: index {int(indices[-1])} out of range ({numel})")
        return indices, 4 + k + 4 * n_esc


# ----------------------------------------------------------------------------- registry
STAGES: dict[int, Stage] = {}  # wire code (the table's enc byte) -> stage
BY_NAME: dict[str, Stage] = {}  # policy name (TensorRule.enc) -> stage


def register(stage: Stage) -> Stage:
    """Make ``stage`` known by its wire code and policy name; both must be new (codes below 0x80)."""
    if not 0 <= stage.code < 0x80 or stage.code in STAGES or stage.name in BY_NAME:
        raise ValueError(f"stage {stage.name!r}: code {stage.code} or name already taken (or not in [0, 0x80))")
    STAGES[stage.code] = BY_NAME[stage.name] = stage
    return stage


register(Float32())
register(Blockwise(1, "q8", bits=8))
register(Blockwise(2, "q4", bits=4))
register(Dithered())
