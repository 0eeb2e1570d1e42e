"""Encoding 4: dithered codes range-coded given the dither (fedsecure/transport/entropy.py)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import zstandard

from fedsecure.config.run import TensorRule
from fedsecure.errors import UpdateRejected
from fedsecure.transport.codec import CodecPolicy, decode, encode, expected_manifest
from fedsecure.transport.entropy import RANGED, S_SCALE, DitheredRanged
from fedsecure.transport.stages import Dithered, Randomness, dither_stream

MAX = 1 << 26
BODY = 7 + 16 + 12 + 1  # magic/version/flags, adapter digest, seed and count, one dense table entry


def _exp(t: dict[str, np.ndarray]) -> list:
    return expected_manifest({k: v.shape for k, v in t.items()})


def _sections(x: np.ndarray, step: float, seed: int = 7) -> tuple[bytes, bytes, np.ndarray]:
    """(encoding 4's section, encoding 3's packed section, the dither) of one flat tensor."""
    u = dither_stream(seed, x.size)
    rule = TensorRule(8, 1.0, step)
    ranged, rec4 = DitheredRanged().encode(x, rule, Randomness(None, u))
    packed, rec3 = Dithered().encode(x, rule, Randomness(None, u))
    np.testing.assert_array_equal(rec4, rec3)  # same quantization, only the lossless stage differs
    return b"".join(ranged), b"".join(packed), u


@pytest.mark.parametrize("step", [1.0, 2.0, 3.0, 6.0])
def test_gaussian_tensors_cost_close_to_the_rate_distortion_bound(step):
    x = (np.random.default_rng(1).standard_normal(16384) * 0.01).astype(np.float32)
    ranged, packed, u = _sections(x, step)
    assert ranged[4] & RANGED, "a Gaussian tensor is range-coded"
    k = ranged[4] & ~RANGED
    (s_code,) = struct.unpack_from("<H", ranged, 5)
    assert abs(s_code / S_SCALE - 1 / step) < 0.05 / step  # the model's std is the tensor's, in steps
    q = np.clip(np.rint(x / np.float32(struct.unpack_from("<f", ranged)[0]) + u), -k, k)
    d = float(np.mean(((q - u) * struct.unpack_from("<f", ranged)[0] - x) ** 2))
    var = float(np.mean(x.astype(np.float64) ** 2))
    bits = 8 * len(ranged) / x.size
    rd = max(0.0, 0.5 * math.log2(var / d))  # Gaussian R(D) at the distortion reached
    unbiased = 0.5 * math.log2(1 + var / d)  # the same, for unbiased reconstruction (what dither gives)
    assert bits - unbiased <= 0.3, (bits, unbiased)  # Zamir-Feder: 0.254 bit plus the coder's overhead
    if step <= 1.0:
        assert bits - rd <= 0.5, (bits, rd)  # the goal where the bulk of the bytes go
    # and it beats every coder blind to the dither: zstd over the packed codes, and their empirical entropy
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    assert len(ranged) < len(zstandard.ZstdCompressor(level=19).compress(packed[5:]))
    assert bits < float(-(p * np.log2(p)).sum())


def test_a_tensor_the_model_does_not_fit_keeps_the_packed_codes():
    x = np.where(np.random.default_rng(2).random(4096) < 0.5, -1.0, 1.0).astype(np.float32)  # two spikes
    x[:8] = 0.0
    ranged, packed, _ = _sections(x, 1.0)
    assert len(ranged) <= len(packed)
    if not ranged[4] & RANGED:
        assert ranged == packed


def _payload(seed: int = 3) -> tuple[dict[str, np.ndarray], bytearray]:
    t = {"w": (np.random.default_rng(seed).standard_normal((32, 32)) * 0.02).astype(np.float32)}
    payload, promised = encode(t, CodecPolicy(TensorRule(8, 1.0, 1.0), (), 0), seed=seed)
    assert payload[BODY + 4] & RANGED
    np.testing.assert_array_equal(decode(payload, _exp(t), max_bytes=MAX)["w"], promised["w"])
    return t, bytearray(payload)


@pytest.mark.parametrize(("offset", "value", "needle"), [
    (BODY + 4, RANGED, "invalid dither step .* code range 0"),
    (BODY + 4, RANGED | 8, "invalid dither step .* code range 8"),
    (BODY + 3, 0xFF, "invalid dither step"),  # negative NaN step
    (BODY + 5, 0, None),  # model std 0 (low byte; high byte below)
    (6, 2, "sent without dither"),  # the no-dither flag on range-coded codes
])
def test_a_malformed_range_coded_section_is_rejected_with_its_reason(offset, value, needle):
    t, p = _payload()
    p[offset] = value
    if needle is None:
        p[offset + 1] = 0
        needle = "does not fit"
    with pytest.raises(UpdateRejected, match=needle):
        decode(bytes(p), _exp(t), max_bytes=MAX)


def test_a_wrong_word_count_or_a_cut_section_is_rejected():
    t, p = _payload()
    (n,) = struct.unpack_from("<H", p, BODY + 7)
    for bad in (n - 1, n + 1, 0, 0xFFFF):
        q = bytearray(p)
        struct.pack_into("<H", q, BODY + 7, bad)
        with pytest.raises(UpdateRejected):
            decode(bytes(q), _exp(t), max_bytes=MAX)
    for cut in (1, 4, 5):
        with pytest.raises(UpdateRejected):
            decode(bytes(p[:-cut]), _exp(t), max_bytes=MAX)
    with pytest.raises(UpdateRejected, match="follow the last section"):
        decode(bytes(p) + b"\0\0\0\0", _exp(t), max_bytes=MAX)


def test_flipped_coder_words_never_crash_the_decoder():
    t, p = _payload()
    (n,) = struct.unpack_from("<H", p, BODY + 7)
    start = BODY + 9
    rng = np.random.default_rng(0)
    outcomes = set()
    for pos in range(start, start + 4 * n):
        for flip in (0x01, 0x80, int(rng.integers(1, 256))):
            q = bytearray(p)
            q[pos] ^= flip
            try:
                out = decode(bytes(q), _exp(t), max_bytes=MAX)["w"]
            except UpdateRejected as e:
                outcomes.add("rejected")
                assert "tensor w" in str(e)
            else:  # any codes the words decode to lie in [-K, K]: a bounded, finite update
                outcomes.add("decoded")
                assert np.all(np.isfinite(out)) and np.abs(out).max() < 8 * np.abs(t["w"]).max()
    assert "decoded" in outcomes  # a range coder has no redundancy to check: the coordinator's bounds do that
    words = np.random.default_rng(1).integers(0, 2**32, n, dtype=np.uint64).astype("<u4").tobytes()
    q = bytearray(p)
    q[start: start + 4 * n] = words
    try:
        decode(bytes(q), _exp(t), max_bytes=MAX)
    except UpdateRejected:
        pass
