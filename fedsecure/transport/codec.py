"""The update codec, format 1: delta -> (error feedback) -> top-k -> blockwise int8/int4 -> zstd.

Wire format::

    b"FSUPD" | u8 version=1 | u8 compressed? | u32 manifest length | manifest | body

The manifest (zstd-compressed with the body when ``compressed``) is JSON
``{"t": [[name, shape, enc, k, size], ...], "raw": body bytes, "block": 64}`` listing every tensor
in order: ``enc`` is ``f32`` | ``q8`` | ``q4``, ``k`` the entries kept (``numel`` = dense),
``size`` the bytes of its section in the body. A section is, when sparse, ``u32 e`` then the
``k`` gaps between sorted kept indices as bytes (255 = escape) then ``e`` little-endian u32
escaped gaps; then, when quantized, one float32 scale per block of 64 values; then the values
(float32, int8, or int4 packed two per byte).

The decoder trusts nothing: the manifest must equal the expected adapter (names, shapes, dtype)
exactly; every declared size is checked against the maximum the expected shapes allow *before*
zstd runs (decompression is capped at that size); indices must be in range and strictly
increasing; scales and values must be finite. Anything else raises
:class:`~fedsecure.errors.UpdateRejected` with the reason.

Quantization uses stochastic rounding by default (unbiased: E[decode(encode(x))] = x), with the
randomness drawn from OS entropy unless a seed is given. The codec only ever sees the DP-noised
update, so it is post-processing and costs no privacy.
"""

from __future__ import annotations

import fnmatch
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsecure.errors import UpdateRejected

MAGIC = b"FSUPD"
VERSION = 1
BLOCK = 64
MAX_MANIFEST = 4 << 20
_Q_LEVELS = {"q8": 127, "q4": 7}


@dataclass(frozen=True)
class TensorRule:
    """How one tensor travels: ``bits`` 32 (float32), 8 or 4; ``topk`` fraction kept (1.0 = dense)."""

    bits: int = 8
    topk: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in (32, 8, 4):
            raise ValueError(f"bits must be 32, 8 or 4; got {self.bits}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1]; got {self.topk}")


@dataclass(frozen=True)
class CodecPolicy:
    """A default rule, per-tensor overrides by glob (first match wins), zstd and rounding."""

    default: TensorRule = field(default_factory=TensorRule)
    overrides: tuple[tuple[str, TensorRule], ...] = ()
    zstd_level: int = 3  # 0 = no zstd
    stochastic: bool = True

    def rule(self, name: str) -> TensorRule:
        for pattern, rule in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        return self.default

    @classmethod
    def parse_overrides(cls, items: Sequence[str]) -> tuple[tuple[str, TensorRule], ...]:
        """``"glob=bits/topk"`` strings, e.g. ``"*kv_b_proj*=32/1.0"`` keeps a sensitive layer exact."""
        out = []
        for item in items:
            try:
                pattern, spec = item.rsplit("=", 1)
                bits, topk = spec.split("/")
                out.append((pattern, TensorRule(int(bits), float(topk))))
            except ValueError as e:
                raise ValueError(f"transport.policy entry {item!r} must look like 'glob=bits/topk', e.g. "
                                 f"'*kv_b_proj*=32/1.0' ({e})") from None
        return tuple(out)


def expected_manifest(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes)]


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


# ----------------------------------------------------------------------------- encode
def _topk(x: np.ndarray, k: int) -> np.ndarray:
    if k >= x.size:
        return np.arange(x.size, dtype=np.int64)
    idx = np.argpartition(np.abs(x), x.size - k)[x.size - k:]
    return np.sort(idx)


def encode(tensors: Mapping[str, np.ndarray], policy: CodecPolicy, *, seed: int | None = None
           ) -> tuple[bytes, dict[str, np.ndarray]]:
    """Encode ``tensors``; returns (payload, what the receiver will decode) for error feedback."""
    import zstandard

    rng = np.random.default_rng(seed) if policy.stochastic else None
    manifest, sections, decoded = [], [], {}
    for name in sorted(tensors):
        x = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise UpdateRejected(f"tensor {name} holds NaN or infinite values; refusing to encode it")
        flat = x.reshape(-1)
        rule = policy.rule(name)
        k = flat.size if rule.topk >= 1.0 else max(1, math.ceil(rule.topk * flat.size))
        parts: list[bytes] = []
        entry = {"name": name, "shape": list(x.shape), "k": k}
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
        if rule.bits == 32:
            entry["enc"] = "f32"
            parts.append(vals.astype("<f4").tobytes())
            rec = vals.astype(np.float32)
        else:
            enc = "q8" if rule.bits == 8 else "q4"
            q, scales = quantize(vals, _Q_LEVELS[enc], rng)
            entry["enc"] = enc
            parts.append(scales.astype("<f4").tobytes())
            parts.append(q.tobytes() if enc == "q8" else _pack4(q))
            rec = dequantize(q, scales)
        section = b"".join(parts)
        entry["size"] = len(section)
        manifest.append(entry)
        sections.append(section)
        full = np.zeros(flat.size, np.float32)
        if idx is None:
            full[:] = rec
        else:
            full[idx] = rec
        decoded[name] = full.reshape(x.shape)
    body = b"".join(sections)
    head = json.dumps({"t": [[e["name"], e["shape"], e["enc"], e["k"], e["size"]] for e in manifest],
                       "raw": len(body), "block": BLOCK}, separators=(",", ":")).encode()
    compressed = policy.zstd_level > 0
    if compressed:
        z = zstandard.ZstdCompressor(level=policy.zstd_level, write_content_size=True)
        head, body = z.compress(head), z.compress(body)
    payload = MAGIC + bytes([VERSION, int(compressed)]) + struct.pack(">I", len(head)) + head + body
    return payload, decoded


# ----------------------------------------------------------------------------- decode
def _value_bytes(k: int, enc: str) -> int:
    nb = -(-k // BLOCK)
    return {"f32": 4 * k, "q8": 4 * nb + k, "q4": 4 * nb + (k + 1) // 2}[enc]


def _max_section(numel: int, k: int, enc: str) -> int:
    """Largest section a tensor may declare: values, plus (sparse) index bytes with every gap escaped."""
    return _value_bytes(k, enc) + (0 if k == numel else 4 + 5 * k)


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
    if len(payload) < 11 or payload[:5] != MAGIC:
        raise UpdateRejected("not a fedsecure update (bad magic)")
    if payload[5] != VERSION:
        raise UpdateRejected(f"update format version {payload[5]} is not supported (this coordinator reads {VERSION})")
    compressed = payload[6]
    if compressed not in (0, 1):
        raise UpdateRejected("unknown compression flag")
    (hlen,) = struct.unpack(">I", payload[7:11])
    if hlen > min(MAX_MANIFEST, len(payload) - 11):
        raise UpdateRejected(f"manifest length {hlen} is out of bounds")
    head_raw, body = payload[11: 11 + hlen], payload[11 + hlen:]
    # the largest honest manifest for this adapter bounds what may be decompressed
    manifest_cap = 256 + sum(len(name) + 16 * (len(shape) + 6) for name, shape in expected)
    if compressed:
        head_raw = _zstd(head_raw, manifest_cap, "manifest")
    try:
        head = json.loads(head_raw)
        tensors, raw_size, block = head["t"], int(head["raw"]), int(head["block"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UpdateRejected("manifest is not valid JSON of the expected form") from None
    if block != BLOCK:
        raise UpdateRejected(f"block size {block} is not {BLOCK}")
    if not isinstance(tensors, list) or len(tensors) != len(expected):
        raise UpdateRejected(f"manifest lists {len(tensors) if isinstance(tensors, list) else '?'} tensors, "
                             f"the adapter has {len(expected)}")
    cap = 0
    plan = []
    for entry, (name, shape) in zip(tensors, expected, strict=True):
        try:
            e_name, e_shape, enc, k, size = entry
            e_shape, k, size = tuple(int(d) for d in e_shape), int(k), int(size)
        except (TypeError, ValueError):
            raise UpdateRejected("manifest entry is malformed") from None
        if e_name != name or e_shape != shape:
            raise UpdateRejected(f"manifest does not match the adapter: got {e_name!r} {list(e_shape)}, "
                                 f"expected {name!r} {list(shape)}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if enc not in ("f32", "q8", "q4") or not 1 <= k <= numel:
            raise UpdateRejected(f"tensor {name}: invalid encoding {enc!r} or k={k} of {numel}")
        limit = _max_section(numel, k, enc)
        if not _value_bytes(k, enc) <= size <= limit:
            raise UpdateRejected(f"tensor {name}: section of {size} bytes is outside [{_value_bytes(k, enc)}, {limit}]")
        cap += size
        plan.append((name, shape, numel, k, enc, size))
    if raw_size != cap:
        raise UpdateRejected(f"declared body size {raw_size} does not match the manifest ({cap})")
    if compressed:
        body = _zstd(body, cap, "compressed body")
    if len(body) != cap:
        raise UpdateRejected(f"body is {len(body)} bytes, the manifest declares {cap}")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape, numel, k, enc, size in plan:
        sec = body[pos: pos + size]
        pos += size
        off = 0
        indices = None
        if k < numel:
            (n_esc,) = struct.unpack("<I", sec[:4])
            if n_esc > k or size != 4 + k + 4 * n_esc + _value_bytes(k, enc):
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
        elif size != _value_bytes(k, enc):
            raise UpdateRejected(f"tensor {name}: dense section of {size} bytes, expected {_value_bytes(k, enc)}")
        if enc == "f32":
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
    return out
