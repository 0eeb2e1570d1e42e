"""Dithered codes range-coded conditioned on the dither: the codec's encoding 4 (policy name ``dq``).

With subtractive dither the sender sends ``q = round(x / step + u)`` and both ends know ``u``. Given
``u``, ``q`` is ``x / step + u`` rounded: if the tensor's values are roughly Gaussian with standard
deviation ``s x step``, ``q`` follows a Gaussian of mean ``u`` and standard deviation ``s``, quantized
to the integers in ``[-K, K]``. Coding each code with *that* distribution spends about ``H(Q | U)``
bits a value, which is less than the ``H(Q)`` that any coder blind to the dither (zstd over the
packed codes, encoding 3) can reach: the rate of entropy-coded dithered quantization (Zamir & Feder
1992), at most about 0.25 bit above the Gaussian rate-distortion bound for unbiased reconstruction,
``1/2 log2(1 + var / D)``. ``bench/bench_codec_entropy.py`` measures both against the bounds.

The coder is constriction's range coder (Bamler; Rust, deterministic integer arithmetic) with its
leaky ``QuantizedGaussian`` model: every code in ``[-K, K]`` keeps a nonzero probability, so a tensor
that is not Gaussian still round-trips exactly and only costs more bits; the sender then keeps the
packed codes where they are smaller (compared after zstd). A section is::

    f32 step | u8 K                                        (packed: the codes as in encoding 3)
    f32 step | u8 K + 0x80 | u16 s x 8192 | u16 n | n x u32 (range-coded: model std, n 32-bit words)

``s`` travels as a multiple of 1/8192, so both ends build the model from the same exact numbers; the
means are the dither values themselves (multiples of 2^-24, exact in float64). A range-coded section
is never larger than the packed codes would be, so the decompression cap is that of encoding 3. The
decoder checks the header, the size and that the words decode to exactly ``k`` codes, and turns any
error of the coder into :class:`~fedsecure.errors.UpdateRejected`.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import numpy as np

from fedsecure.errors import UpdateRejected
from fedsecure.transport.stages import (
    _DQ_HEAD,
    KMAX,
    Dithered,
    Randomness,
    _dq_bytes,
    _pack_base,
    dither_dequantize,
    dither_quantize,
    register,
)

if TYPE_CHECKING:
    from fedsecure.config.run import TensorRule

RANGED = 0x80  # the K byte's flag: the codes are range-coded
S_SCALE = 8192  # the model's standard deviation travels as a multiple of 1 / S_SCALE
_RC_HEAD = struct.Struct("<HH")  # model std x S_SCALE, number of 32-bit words
MAX_WORDS = 0xFFFF


def _model(K: int):  # noqa: ANN202 - constriction's model type has no stub
    import constriction

    return constriction.stream.model.QuantizedGaussian(-K, K)


def std_code(x: np.ndarray, step: float) -> int:
    """The model's standard deviation for ``x`` at ``step``, in units of 1 / :data:`S_SCALE` (at least 1)."""
    s = float(np.linalg.norm(x)) / math.sqrt(x.size) / step
    return int(min(max(round(s * S_SCALE), 1), MAX_WORDS))


def range_encode(q: np.ndarray, u: np.ndarray, K: int, s_code: int) -> bytes:
    """The 32-bit words (little-endian) of codes ``q`` in ``[-K, K]`` under the model given the dither ``u``."""
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(q.astype(np.int32), _model(K), u.astype(np.float64), np.full(q.size, s_code / S_SCALE))
    return enc.get_compressed().astype("<u4").tobytes()


def range_decode(words: bytes, k: int, u: np.ndarray, K: int, s_code: int, name: str) -> np.ndarray:
    """The ``k`` codes of ``words``; raises UpdateRejected where they do not decode to exactly ``k`` codes."""
    import constriction

    try:
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
        q = dec.decode(_model(K), u.astype(np.float64), np.full(k, s_code / S_SCALE))
        exhausted = dec.maybe_exhausted()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a Rust panic surfaces as pyo3's PanicException (a BaseException)
        raise UpdateRejected(f"tensor {name}: range-coded codes do not decode ({type(e).__name__}: {e})") from None
    if not exhausted or q.size != k:
        raise UpdateRejected(f"tensor {name}: range-coded section does not hold exactly {k} codes")
    return q.astype(np.int8)


class DitheredRanged(Dithered):
    """Subtractive dithered quantization (as encoding 3), the codes range-coded given the dither where that is
    smaller than packing them (compared with the packed codes as they are and after zstd).
    """

    code, name, dithered = 4, "dq", True

    def dense_bytes(self, body: bytes, pos: int, k: int) -> int:
        """Packed: as encoding 3; range-coded: the header and the word count it gives."""
        if pos + _DQ_HEAD.size + _RC_HEAD.size <= len(body) and body[pos + 4] & RANGED:
            _, n = _RC_HEAD.unpack_from(body, pos + _DQ_HEAD.size)
            return _DQ_HEAD.size + _RC_HEAD.size + 4 * n
        return super().dense_bytes(body, pos, k)

    def encode(self, vals: np.ndarray, rule: TensorRule, rand: Randomness) -> tuple[list[bytes], np.ndarray]:
        """Header then the codes, range-coded or packed, whichever is smaller."""
        u = rand.dither(vals.size)
        step, K, q = dither_quantize(vals, rule.dither, u)
        rec = dither_dequantize(step, q, u)
        if step == 0:
            return [_DQ_HEAD.pack(0.0, 0)], rec
        packed = _pack_base(q, K)
        if u is not None and K > 0:  # K = 0: every code is 0 and packing takes no bytes at all
            s_code = std_code(vals, float(step))
            words = range_encode(q, u, K, s_code)
            if len(words) // 4 <= MAX_WORDS and _RC_HEAD.size + len(words) < min(len(packed), _zstd_size(packed)):
                return [_DQ_HEAD.pack(float(step), K | RANGED), _RC_HEAD.pack(s_code, len(words) // 4), words], rec
        return [_DQ_HEAD.pack(float(step), K), packed], rec

    def decode(self, sec: bytes, off: int, k: int, name: str, rand: Randomness) -> np.ndarray:
        """Checks the header, the model, the size (never above the packed codes') and the words."""
        if len(sec) - off < _DQ_HEAD.size:
            raise UpdateRejected(f"tensor {name}: dithered section too short")
        if not sec[off + 4] & RANGED:
            return super().decode(sec, off, k, name, rand)
        step, kb = _DQ_HEAD.unpack_from(sec, off)
        K = kb & ~RANGED
        if not (math.isfinite(step) and step > 0) or not 1 <= K <= KMAX:
            raise UpdateRejected(f"tensor {name}: invalid dither step {step} or code range {K}")
        if len(sec) - off < _DQ_HEAD.size + _RC_HEAD.size:
            raise UpdateRejected(f"tensor {name}: range-coded section too short")
        s_code, n = _RC_HEAD.unpack_from(sec, off + _DQ_HEAD.size)
        size = _DQ_HEAD.size + _RC_HEAD.size + 4 * n
        if s_code == 0 or n == 0 or len(sec) - off != size or size > _dq_bytes(k, K):
            raise UpdateRejected(f"tensor {name}: range-coded section of {len(sec) - off} bytes (model {s_code}, "
                                 f"{n} words) does not fit {k} codes")
        u = rand.dither(k)
        if u is None:
            raise UpdateRejected(f"tensor {name}: range-coded codes in an update sent without dither")
        q = range_decode(sec[off + size - 4 * n: off + size], k, u, K, s_code, name)
        return dither_dequantize(np.float32(step), q, u)


def _zstd_size(packed: bytes) -> int:
    """What zstd makes of the packed codes alone (roughly what the frame's zstd would give them)."""
    import zstandard

    return len(zstandard.ZstdCompressor(level=3).compress(packed))


register(DitheredRanged())

__all__ = ["MAX_WORDS", "RANGED", "S_SCALE", "DitheredRanged", "range_decode", "range_encode", "std_code"]
