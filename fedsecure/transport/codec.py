"""The update codec, format 3: delta -> (error feedback) -> top-k -> quantization -> entropy coding -> zstd.

Wire format::

    b"FSUPD" | u8 version=3 | u8 flags | frame

``flags`` bit 0: the frame is one zstd frame (else raw); bit 1: dithered tensors were quantized
without dither (round to nearest). The frame holds a table, then one section per tensor in the
adapter's (sorted) order::

    table = adapter digest (16 bytes) | u64 dither seed | u32 n | n x entry
    entry = u8 enc                                   (dense: every entry kept)
          | u8 enc + 0x80, u32 k, u32 size           (sparse: k entries kept, section of size bytes)

The adapter digest is SHA-256 over every expected tensor's name, shape and dtype: the payload
names the adapter it encodes without spelling out names (which cost more than the values of a
small LoRA update). ``enc`` is 0 float32 | 1 int8 | 2 int4 | 3 dithered, packed | 4 dithered, range-coded
given the dither where that is smaller (:mod:`fedsecure.transport.entropy`; what a dithered rule sends,
new in format 3). A dense section's size
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

This module owns the wire format (header, table, zstd framing, size caps, adapter digest), the
policy and the drivers; each encoding is a :class:`~fedsecure.transport.stages.Stage` in
:mod:`fedsecure.transport.stages`, found by its ``enc`` code or policy name in its registry, and
the sparse indices are :class:`~fedsecure.transport.stages.TopKGaps`.
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

import fedsecure.transport.entropy  # noqa: F401 - registers encoding 4, what dithered rules send
from fedsecure.config.run import TensorRule, parse_tensor_rules
from fedsecure.errors import UpdateRejected
from fedsecure.transport.stages import (
    BLOCK,
    BY_NAME,
    KMAX,
    STAGES,
    Randomness,
    Stage,
    TopKGaps,
    dequantize,
    dither_dequantize,
    dither_quantize,
    dither_stream,
    quantize,
)

__all__ = [
    "BLOCK", "KMAX", "MAGIC", "VERSION", "CodecPolicy", "TensorRule", "adapter_digest", "decode", "dequantize",
    "dither_dequantize", "dither_quantize", "dither_stream", "encode", "expected_manifest", "max_frame_bytes",
    "quantize",
]

MAGIC = b"FSUPD"
VERSION = 3
_FLAG_ZSTD, _FLAG_NO_DITHER = 1, 2
_SPARSE = 0x80
_SPARSE_ENTRY = struct.Struct("<II")
_TABLE_HEAD = struct.Struct("<QI")  # after the 16-byte digest: dither seed, tensor count
_HEAD_BYTES = 16 + _TABLE_HEAD.size


@dataclass(frozen=True)
class CodecPolicy:
    """A default rule, per-tensor overrides by glob (first match wins), zstd and rounding."""

    default: TensorRule = field(default_factory=TensorRule)
    overrides: tuple[tuple[str, TensorRule], ...] = ()
    zstd_level: int = 3  # 0 = no zstd
    stochastic: bool = True  # stochastic rounding (int8/int4) and dither (dithered); False = round to nearest

    def rule(self, name: str) -> TensorRule:
        """The rule of tensor ``name``: the first override whose glob matches, else the default."""
        for pattern, rule in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        return self.default

    @classmethod
    def parse_overrides(cls, items: Sequence[str]) -> tuple[tuple[str, TensorRule], ...]:
        """``"glob=bits/topk"`` strings (:func:`fedsecure.config.run.parse_tensor_rules`)."""
        return parse_tensor_rules(items)


def expected_manifest(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) list an update of these tensors carries, in the codec's (sorted) order."""
    return [(k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes)]


def adapter_digest(expected: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    """16 bytes naming an adapter layout: SHA-256 over every tensor's name, shape and dtype, in order."""
    h = hashlib.sha256(b"fedsecure-adapter-manifest\0")
    for name, shape in expected:
        h.update(name.encode() + b"\0" + ",".join(str(int(d)) for d in shape).encode() + b"\0float32\0")
    return h.digest()[:16]


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _scatter(vals: np.ndarray, indices: np.ndarray | None, numel: int, shape: tuple[int, ...]) -> np.ndarray:
    full = np.zeros(numel, np.float32)
    if indices is None:
        full[:] = vals
    else:
        full[indices] = vals
    return full.reshape(shape)


# ----------------------------------------------------------------------------- encode
def encode(tensors: Mapping[str, np.ndarray], policy: CodecPolicy, *, seed: int | None = None
           ) -> tuple[bytes, dict[str, np.ndarray]]:
    """Encode ``tensors``; returns (payload, what the receiver will decode) for error feedback.

    ``seed`` fixes the rounding and dither randomness (reproducible runs); None draws it from the OS.
    """
    import zstandard

    if seed is None:
        seed = secrets.randbits(64)
    seed &= (1 << 64) - 1
    names = sorted(tensors)
    shapes = [(n, tuple(int(d) for d in np.shape(tensors[n]))) for n in names]
    n_dither = 0
    plan: list[tuple[str, TensorRule, Stage, tuple[int, ...], np.ndarray, int]] = []
    for name in names:
        rule = policy.rule(name)
        stage = BY_NAME[rule.enc]
        x = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise UpdateRejected(f"tensor {name} holds NaN or infinite values; refusing to encode it")
        flat = x.reshape(-1)
        k = flat.size if rule.topk >= 1.0 else max(1, math.ceil(rule.topk * flat.size))
        plan.append((name, rule, stage, x.shape, flat, k))
        n_dither += k if stage.dithered else 0
    rand = Randomness(np.random.default_rng(seed) if policy.stochastic else None,
                      dither_stream(seed, n_dither) if policy.stochastic else None)
    entries, sections, decoded = [], [], {}
    for name, rule, stage, shape, flat, k in plan:
        idx = TopKGaps.select(flat, k) if k < flat.size else None
        parts = [] if idx is None else TopKGaps.encode(idx)
        values, rec = stage.encode(flat if idx is None else flat[idx], rule, rand)
        section = b"".join(parts + values)
        if idx is None:
            entries.append(bytes([stage.code]))
        else:
            entries.append(bytes([stage.code | _SPARSE]) + _SPARSE_ENTRY.pack(k, len(section)))
        sections.append(section)
        decoded[name] = _scatter(rec, idx, flat.size, shape)
    body = b"".join(sections)
    frame = adapter_digest(shapes) + _TABLE_HEAD.pack(seed, len(names)) + b"".join(entries) + body
    flags = 0 if policy.stochastic else _FLAG_NO_DITHER
    if policy.zstd_level > 0:
        # min_match=7: matches rarely pay in quantized codes, and shorter ones crowd out the entropy stage
        params = zstandard.ZstdCompressionParameters.from_level(policy.zstd_level, min_match=7,
                                                                  write_content_size=True)
        frame = zstandard.ZstdCompressor(compression_params=params).compress(frame)
        flags |= _FLAG_ZSTD
    return MAGIC + bytes([VERSION, flags]) + frame, decoded


# ----------------------------------------------------------------------------- decode
def _table_bytes(n: int) -> int:
    """The largest table of ``n`` tensors (all sparse)."""
    return _HEAD_BYTES + (1 + _SPARSE_ENTRY.size) * n


def max_frame_bytes(expected: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    """The largest frame any honest encoding of this adapter can have (the decompression cap)."""
    total = _table_bytes(len(expected))
    for _, shape in expected:
        numel = _numel(shape)  # the widest encoding, dense or sparse
        total += max(stage.max_bytes(numel) for stage in STAGES.values()) + TopKGaps.max_bytes(numel)
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


def _frame(payload: object, expected: Sequence[tuple[str, tuple[int, ...]]], max_bytes: int) -> tuple[int, bytes]:
    """(flags, decompressed frame) of a payload whose header, size and frame size check out."""
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
    return flags, frame


_Plan = list[tuple[str, tuple[int, ...], int, int, Stage, int | None]]


def _table(frame: bytes, expected: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[int, _Plan, int]:
    """(dither seed, per tensor (name, shape, numel, k, stage, sparse section size or None), body offset)."""
    n_exp = len(expected)
    if len(frame) < _HEAD_BYTES:
        raise UpdateRejected("update frame is too short for its table")
    digest, (seed, n) = frame[:16], _TABLE_HEAD.unpack_from(frame, 16)
    if n != n_exp:
        raise UpdateRejected(f"update lists {n} tensors, the adapter has {n_exp}")
    if digest != adapter_digest(expected):
        raise UpdateRejected("update does not match the adapter: its manifest digest (tensor names, shapes, dtype) "
                             "differs from the coordinator's; the site runs another model or LoRA configuration")
    plan: _Plan = []
    pos = _HEAD_BYTES
    for name, shape in expected:
        numel = _numel(shape)
        if pos >= len(frame):
            raise UpdateRejected("update frame is too short for its table")
        code = frame[pos]
        pos += 1
        stage = STAGES.get(code & ~_SPARSE)
        if stage is None:
            raise UpdateRejected(f"tensor {name}: invalid encoding {code}")
        size: int | None = None  # dense: the size follows from the encoding
        k = numel
        if code & _SPARSE:
            if pos + _SPARSE_ENTRY.size > len(frame):
                raise UpdateRejected("update frame is too short for its table")
            k, size = _SPARSE_ENTRY.unpack_from(frame, pos)
            pos += _SPARSE_ENTRY.size
            if not 1 <= k < numel:
                raise UpdateRejected(f"tensor {name}: sparse with k={k} of {numel}")
            lo, limit = stage.min_bytes(k), stage.max_bytes(k) + TopKGaps.max_bytes(k)
            if not lo <= size <= limit:
                raise UpdateRejected(f"tensor {name}: section of {size} bytes is outside [{lo}, {limit}]")
        plan.append((name, shape, numel, k, stage, size))
    return seed, plan, pos


def decode(payload: bytes, expected: Sequence[tuple[str, tuple[int, ...]]], *, max_bytes: int) -> dict[str, np.ndarray]:
    """Decode an update against the expected adapter manifest; rejects anything else with a reason."""
    flags, frame = _frame(payload, expected, max_bytes)
    seed, plan, pos = _table(frame, expected)
    body = frame[pos:]
    n_dither = sum(k for _, _, _, k, stage, _ in plan if stage.dithered)
    rand = Randomness(None, None if flags & _FLAG_NO_DITHER else dither_stream(seed, n_dither))
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape, numel, k, stage, size in plan:
        if size is None:
            size = stage.dense_bytes(body, pos, k)
        if pos + size > len(body):
            raise UpdateRejected(f"tensor {name}: the body ends inside its section")
        sec = body[pos: pos + size]
        pos += size
        indices, off = (None, 0) if k == numel else TopKGaps.decode(sec, k, numel, stage.min_bytes(k), name)
        vals = stage.decode(sec, off, k, name, rand)
        if not np.all(np.isfinite(vals)):
            raise UpdateRejected(f"tensor {name} holds NaN or infinite values")
        out[name] = _scatter(vals, indices, numel, shape)
    if pos != len(body):
        raise UpdateRejected(f"{len(body) - pos} bytes follow the last section")
    return out
