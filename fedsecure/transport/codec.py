"""The update codec, format 2: delta -> (error feedback) -> top-k -> quantization -> zstd.

Wire format::

    b"FSUPD" | u8 version=2 | u8 flags | frame

``flags`` bit 0: the frame is one zstd frame (else raw); bit 1: dithered tensors were quantized
without dither (round to nearest). The frame holds a table, then one section per tensor in the
adapter's (sorted) order::

    table = adapter digest (16 bytes) | u64 dither seed | u32 n | n x entry
    entry = u8 enc                                   (dense: every entry kept)
          | u8 enc + 0x80, u32 k, u32 size           (sparse: k entries kept, section of size bytes)

The adapter digest is SHA-256 over every expected tensor's name, shape and dtype: the payload
names the adapter it encodes without spelling out names (which cost more than the values of a
small LoRA update). ``enc`` is 0 float32 | 1 int8 | 2 int4 | 3 dithered. A dense section's size
follows from its encoding (and, dithered, from its code range K). A section is, when sparse, ``u32 e`` then
the ``k`` gaps between sorted kept indices as bytes (255 = escape) then ``e`` little-endian u32
escaped gaps; then the values: float32; or (int8/int4) one float32 scale per block of 64 values
and the codes (int4 two per byte); or (dithered) ``f32 step | u8 K`` and the codes ``q + K`` in
``[0, 2K]``, ``K <= 7``, packed in base ``2K + 1`` as many per byte as fit (5 for K = 1, 3 for
K = 2), so that zstd's entropy stage can spend less than one bit on a value.

Dithered quantization (subtractive dither): ``q = round(x / step + u)`` and the receiver takes
``(q - u) * step``, where ``u`` is uniform on [-1/2, 1/2) and both ends draw it from PCG64 seeded
with the payload's dither seed (one stream, consumed in table order). The error is then uniform
on [-step/2, step/2] and independent of ``x``: unbiased, at half the variance of stochastic
rounding for the same codes. ``step`` is the policy's multiple of the tensor's RMS (raised when
needed so that ``|q| <= 7``). Int8/int4 use stochastic rounding (unbiased) by default.

The decoder trusts nothing: the digest must equal that of the expected adapter; the table and body
sizes are checked against the maximum the expected shapes allow *before* zstd runs (decompression
is capped at that size); indices must be in range and strictly increasing; codes in range; scales,
steps and values finite. Anything else raises :class:`~fedsecure.errors.UpdateRejected` with the
reason. The codec only ever sees the DP-noised update, so it is post-processing and costs no
privacy; the dither and rounding randomness need not be secret.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsecure.errors import UpdateRejected

MAGIC = b"FSUPD"
VERSION = 2
BLOCK = 64
KMAX = 7  # dithered codes lie in [-KMAX, KMAX]
_Q_LEVELS = {"q8": 127, "q4": 7}
_ENC = {"f32": 0, "q8": 1, "q4": 2, "dq": 3}
_ENC_NAME = {v: k for k, v in _ENC.items()}
_FLAG_ZSTD, _FLAG_NO_DITHER = 1, 2
_SPARSE = 0x80
_SPARSE_ENTRY = struct.Struct("<II")


@dataclass(frozen=True)
class TensorRule:
    """How one tensor travels: ``bits`` 32 (float32), 8 or 4; ``topk`` fraction kept (1.0 = dense);
    ``dither`` > 0: dithered quantization with a step of ``dither`` x the tensor's RMS (``bits`` unused)."""

    bits: int = 8
    topk: float = 1.0
    dither: float = 0.0

    def __post_init__(self) -> None:
        if self.bits not in (32, 8, 4):
            raise ValueError(f"bits must be 32, 8 or 4; got {self.bits}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1]; got {self.topk}")
        if not (math.isfinite(self.dither) and 0.0 <= self.dither <= 1000.0):
            raise ValueError(f"dither step must be in [0, 1000] (x RMS; 0 = off); got {self.dither}")

    @property
    def enc(self) -> str:
        return "dq" if self.dither > 0 else {32: "f32", 8: "q8", 4: "q4"}[self.bits]


@dataclass(frozen=True)
class CodecPolicy:
    """A default rule, per-tensor overrides by glob (first match wins), zstd and rounding."""

    default: TensorRule = field(default_factory=TensorRule)
    overrides: tuple[tuple[str, TensorRule], ...] = ()
    zstd_level: int = 3  # 0 = no zstd
    stochastic: bool = True  # stochastic rounding (int8/int4) and dither (dithered); False = round to nearest

    def rule(self, name: str) -> TensorRule:
        for pattern, rule in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        return self.default

    @classmethod
    def parse_overrides(cls, items: Sequence[str]) -> tuple[tuple[str, TensorRule], ...]:
        """``"glob=bits/topk"`` strings; ``bits`` is 32, 8, 4 or ``d<step>`` (dithered, step x RMS).

        E.g. ``"*kv_b_proj*=32/1.0"`` keeps a sensitive layer exact, ``"*lora_A*=d6/1.0"`` sends the
        LoRA A matrices coarser than the rest."""
        out = []
        for item in items:
            try:
                pattern, spec = item.rsplit("=", 1)
                bits, topk = spec.split("/")
                if bits.startswith("d"):
                    rule = TensorRule(8, float(topk), float(bits[1:]))
                    if rule.dither <= 0:
                        raise ValueError("a dither step must be > 0")
                else:
                    rule = TensorRule(int(bits), float(topk))
                out.append((pattern, rule))
            except ValueError as e:
                raise ValueError(f"transport.policy entry {item!r} must look like 'glob=bits/topk' with bits 32, 8, 4 "
                                 f"or d<step>, e.g. '*kv_b_proj*=32/1.0' or '*lora_A*=d6/1.0' ({e})") from None
        return tuple(out)


def expected_manifest(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes)]


def adapter_digest(expected: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    """16 bytes naming an adapter layout: SHA-256 over every tensor's name, shape and dtype, in order."""
    h = hashlib.sha256(b"fedsecure-adapter-manifest\0")
    for name, shape in expected:
        h.update(name.encode() + b"\0" + ",".join(str(int(d)) for d in shape).encode() + b"\0float32\0")
    return h.digest()[:16]


# ----------------------------------------------------------------------------- quantization
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
    base = 2 * K + 1
    return 0 if K == 0 else int(math.floor(math.log(256) / math.log(base) + 1e-9))


def _dq_bytes(k: int, K: int) -> int:
    per = _per_byte(K)
    return 5 + (0 if per == 0 else -(-k // per))


def dither_stream(seed: int, n: int) -> np.ndarray:
    """``n`` dither values (float32), uniform on [-1/2, 1/2) in steps of 2^-24: two per 64-bit output
    of PCG64 (high 24 bits first, then bits 8..31). PCG64's raw stream is fixed by NumPy's stream
    compatibility policy for bit generators; a known-answer test pins it."""
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


# ----------------------------------------------------------------------------- encode
def _topk(x: np.ndarray, k: int) -> np.ndarray:
    if k >= x.size:
        return np.arange(x.size, dtype=np.int64)
    idx = np.argpartition(np.abs(x), x.size - k)[x.size - k:]
    return np.sort(idx)


def encode(tensors: Mapping[str, np.ndarray], policy: CodecPolicy, *, seed: int | None = None
           ) -> tuple[bytes, dict[str, np.ndarray]]:
    """Encode ``tensors``; returns (payload, what the receiver will decode) for error feedback.

    ``seed`` fixes the rounding and dither randomness (reproducible runs); None draws it from the OS.
    """
    import zstandard

    if seed is None:
        seed = secrets.randbits(64)
    seed &= (1 << 64) - 1
    rng = np.random.default_rng(seed) if policy.stochastic else None
    names = sorted(tensors)
    shapes = [(n, tuple(int(d) for d in np.shape(tensors[n]))) for n in names]
    rules = [policy.rule(n) for n in names]
    n_dither = 0
    plan = []
    for name, rule in zip(names, rules, strict=True):
        x = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise UpdateRejected(f"tensor {name} holds NaN or infinite values; refusing to encode it")
        flat = x.reshape(-1)
        k = flat.size if rule.topk >= 1.0 else max(1, math.ceil(rule.topk * flat.size))
        plan.append((name, rule, x.shape, flat, k))
        if rule.enc == "dq":
            n_dither += k
    dither = dither_stream(seed, n_dither) if policy.stochastic else None
    d_pos = 0
    entries, sections, decoded = [], [], {}
    for name, rule, shape, flat, k in plan:
        parts: list[bytes] = []
        if k < flat.size:
            idx = _topk(flat, k)
            gaps = np.diff(idx, prepend=-1).astype(np.int64)  # first gap = idx[0] + 1 >= 1
            escaped = gaps >= 255
            parts.append(struct.pack("<I", int(escaped.sum())))
            parts.append(np.where(escaped, 255, gaps).astype(np.uint8).tobytes())
            parts.append(gaps[escaped].astype("<u4").tobytes())
            vals = flat[idx]
        else:
            idx, vals = None, flat
        enc = rule.enc
        if enc == "f32":
            parts.append(vals.astype("<f4").tobytes())
            rec = vals.astype(np.float32)
        elif enc == "dq":
            u = None if dither is None else dither[d_pos: d_pos + k]
            d_pos += k
            step, K, q = dither_quantize(vals, rule.dither, u)
            parts.append(struct.pack("<fB", float(step), K))
            parts.append(_pack_base(q, K) if step != 0 else b"")
            rec = dither_dequantize(step, q, u)
        else:
            q, scales = quantize(vals, _Q_LEVELS[enc], rng)
            parts.append(scales.astype("<f4").tobytes())
            parts.append(q.tobytes() if enc == "q8" else _pack4(q))
            rec = dequantize(q, scales)
        section = b"".join(parts)
        if k < flat.size:
            entries.append(bytes([_ENC[enc] | _SPARSE]) + _SPARSE_ENTRY.pack(k, len(section)))
        else:
            entries.append(bytes([_ENC[enc]]))
        sections.append(section)
        full = np.zeros(flat.size, np.float32)
        if idx is None:
            full[:] = rec
        else:
            full[idx] = rec
        decoded[name] = full.reshape(shape)
    body = b"".join(sections)
    frame = adapter_digest(shapes) + struct.pack("<QI", seed, len(names)) + b"".join(entries) + body
    flags = 0 if policy.stochastic else _FLAG_NO_DITHER
    if policy.zstd_level > 0:
        # min_match=7: matches rarely pay in quantized codes, and shorter ones crowd out the entropy stage
        params = zstandard.ZstdCompressionParameters.from_level(policy.zstd_level, min_match=7,
                                                                  write_content_size=True)
        frame = zstandard.ZstdCompressor(compression_params=params).compress(frame)
        flags |= _FLAG_ZSTD
    return MAGIC + bytes([VERSION, flags]) + frame, decoded


# ----------------------------------------------------------------------------- decode
def _value_bytes(k: int, enc: str) -> int:
    """Fewest bytes the values of ``k`` entries can take in encoding ``enc``."""
    nb = -(-k // BLOCK)
    return {"f32": 4 * k, "q8": 4 * nb + k, "q4": 4 * nb + (k + 1) // 2, "dq": 5}[enc]


def _max_value_bytes(k: int, enc: str) -> int:
    return _dq_bytes(k, KMAX) if enc == "dq" else _value_bytes(k, enc)


def _max_section(numel: int, k: int, enc: str) -> int:
    """Largest section a tensor may declare: values, plus (sparse) index bytes with every gap escaped."""
    return _max_value_bytes(k, enc) + (0 if k == numel else 4 + 5 * k)


def _table_bytes(n: int) -> int:
    """The largest table of ``n`` tensors (all sparse)."""
    return 28 + (1 + _SPARSE_ENTRY.size) * n


def max_frame_bytes(expected: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    """The largest frame any honest encoding of this adapter can have (the decompression cap)."""
    total = _table_bytes(len(expected))
    for _, shape in expected:
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        total += max(_max_value_bytes(numel, enc) for enc in _ENC) + 4 + 5 * numel  # dense or sparse
    return total


def _zstd(data: bytes, cap: int, what: str) -> bytes:
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)  # the frame header's claim, read before any work
        if declared > cap:
            raise UpdateRejected(f"{what} declares {declared} bytes, larger than allowed ({cap})")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=cap)
    except zstandard.ZstdError as e:
        raise UpdateRejected(f"{what} is corrupt or larger than allowed ({e})") from None
    if len(out) > cap:
        raise UpdateRejected(f"{what} is larger than allowed ({cap})")
    return out


def decode(payload: bytes, expected: Sequence[tuple[str, tuple[int, ...]]], *, max_bytes: int) -> dict[str, np.ndarray]:
    """Decode an update against the expected adapter manifest; rejects anything else with a reason."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise UpdateRejected("update payload is not bytes")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise UpdateRejected(f"update is {len(payload)} bytes, over the {max_bytes}-byte limit")
    if len(payload) < 7 or payload[:5] != MAGIC:
        raise UpdateRejected("not a fedsecure update (bad magic)")
    if payload[5] != VERSION:
        raise UpdateRejected(f"update format version {payload[5]} is not supported (this fedsecure reads "
                             f"{VERSION}); run the same fedsecure release at the coordinator and every site")
    flags = payload[6]
    if flags & ~(_FLAG_ZSTD | _FLAG_NO_DITHER):
        raise UpdateRejected(f"unknown flags {flags:#x}")
    cap = max_frame_bytes(expected)
    frame = payload[7:]
    if flags & _FLAG_ZSTD:
        frame = _zstd(frame, cap, "update frame")
    elif len(frame) > cap:
        raise UpdateRejected(f"update frame is {len(frame)} bytes, larger than this adapter allows ({cap})")
    n_exp = len(expected)
    if len(frame) < 28:
        raise UpdateRejected("update frame is too short for its table")
    digest, (seed, n) = frame[:16], struct.unpack("<QI", frame[16:28])
    if n != n_exp:
        raise UpdateRejected(f"update lists {n} tensors, the adapter has {n_exp}")
    if digest != adapter_digest(expected):
        raise UpdateRejected("update does not match the adapter: its manifest digest (tensor names, shapes, dtype) "
                             "differs from the coordinator's; the site runs another model or LoRA configuration")
    plan, n_dither, pos = [], 0, 28
    for name, shape in expected:
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if pos >= len(frame):
            raise UpdateRejected("update frame is too short for its table")
        code = frame[pos]
        pos += 1
        enc = _ENC_NAME.get(code & ~_SPARSE)
        if enc is None:
            raise UpdateRejected(f"tensor {name}: invalid encoding {code}")
        if code & _SPARSE:
            if pos + _SPARSE_ENTRY.size > len(frame):
                raise UpdateRejected("update frame is too short for its table")
            k, size = _SPARSE_ENTRY.unpack_from(frame, pos)
            pos += _SPARSE_ENTRY.size
            if not 1 <= k < numel:
                raise UpdateRejected(f"tensor {name}: sparse with k={k} of {numel}")
            limit = _max_section(numel, k, enc)
            if not _value_bytes(k, enc) <= size <= limit:
                raise UpdateRejected(f"tensor {name}: section of {size} bytes is outside "
                                     f"[{_value_bytes(k, enc)}, {limit}]")
        else:
            k, size = numel, None  # dense: the size follows from the encoding
        n_dither += k if enc == "dq" else 0
        plan.append((name, shape, numel, k, enc, size))
    body = frame[pos:]
    dither = None if flags & _FLAG_NO_DITHER else dither_stream(seed, n_dither)
    d_pos = 0
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape, numel, k, enc, size in plan:
        if size is None:
            size = _value_bytes(k, enc)
            if enc == "dq" and pos + 5 <= len(body):  # dense dithered: the code range K sets the size
                step, K = struct.unpack_from("<fB", body, pos)
                size = _dq_bytes(k, K) if step != 0 and K <= KMAX else 5
        if pos + size > len(body):
            raise UpdateRejected(f"tensor {name}: the body ends inside its section")
        sec = body[pos: pos + size]
        pos += size
        off = 0
        indices = None
        if k < numel:
            (n_esc,) = struct.unpack("<I", sec[:4])
            if n_esc > k or size < 4 + k + 4 * n_esc + _value_bytes(k, enc):
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
            off = 4 + k + 4 * n_esc
        if enc == "dq":
            step, K = struct.unpack_from("<fB", sec, off)
            if not (math.isfinite(step) and step >= 0) or K > KMAX or (step == 0 and K != 0):
                raise UpdateRejected(f"tensor {name}: invalid dither step {step} or code range {K}")
            want = _dq_bytes(k, K) if step != 0 else 5
            if size - off != want:
                raise UpdateRejected(f"tensor {name}: dithered section of {size - off} bytes, expected {want}")
            u = None if dither is None else dither[d_pos: d_pos + k]
            d_pos += k
            q = _unpack_base(sec[off + 5:], k, K, name) if step != 0 else np.zeros(k, np.int8)
            vals = dither_dequantize(np.float32(step), q, u)
        elif size - off != _value_bytes(k, enc):
            raise UpdateRejected(f"tensor {name}: section of {size} bytes does not match {k} {enc} values")
        elif enc == "f32":
            vals = np.frombuffer(sec, "<f4", count=k, offset=off).astype(np.float32)
        else:
            nb = -(-k // BLOCK)
            scales = np.frombuffer(sec, "<f4", count=nb, offset=off).astype(np.float32)
            if not np.all(np.isfinite(scales)) or np.any(scales < 0):
                raise UpdateRejected(f"tensor {name}: non-finite or negative scales")
            off += 4 * nb
            if enc == "q8":
                q = np.frombuffer(sec, np.int8, count=k, offset=off)
                if np.any(q == -128):
                    raise UpdateRejected(f"tensor {name}: code out of range")
            else:
                q = _unpack4(sec[off:], k)
                if np.any(np.abs(q) > 7):
                    raise UpdateRejected(f"tensor {name}: code out of range")
            vals = dequantize(q, scales)
        if not np.all(np.isfinite(vals)):
            raise UpdateRejected(f"tensor {name} holds NaN or infinite values")
        full = np.zeros(numel, np.float32)
        if indices is None:
            full[:] = vals
        else:
            full[indices] = vals
        out[name] = full.reshape(shape)
    if pos != len(body):
        raise UpdateRejected(f"{len(body) - pos} bytes follow the last section")
    return out
