"""Transport codec: round trips and error bounds (properties), unbiased rounding, a strict decoder (fuzz)."""

from __future__ import annotations

import random
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsecure.config import TransportSettings
from fedsecure.errors import UpdateRejected
from fedsecure.transport.codec import BLOCK, CodecPolicy, TensorRule, decode, encode, expected_manifest, quantize
from fedsecure.transport.session import NO_BASE, RESEND_FULL, DownlinkTracker, site_encode, site_receive

MAX = 1 << 24


def _tensors(seed: int, shapes=((8, 64), (64, 8), (3,), (130, 7))) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"m.{i}.lora_{'AB'[i % 2]}.weight": (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 2)).astype(
        np.float32) for i, s in enumerate(shapes)}


def _exp(t):
    return expected_manifest({k: v.shape for k, v in t.items()})


rules = st.builds(TensorRule, bits=st.sampled_from([32, 8, 4]), topk=st.sampled_from([1.0, 0.5, 0.1, 0.01]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), rule=rules, zstd=st.sampled_from([0, 3]), stochastic=st.booleans())
def test_round_trip_and_error_bound_of_every_stage(seed, rule, zstd, stochastic):
    t = _tensors(seed)
    payload, promised = encode(t, CodecPolicy(rule, (), zstd, stochastic), seed=seed)
    out = decode(payload, _exp(t), max_bytes=MAX)
    for k, x in t.items():
        assert out[k].shape == x.shape and out[k].dtype == np.float32
        np.testing.assert_array_equal(out[k], promised[k])  # the sender knows exactly what arrives (EF)
        flat, got = x.reshape(-1), out[k].reshape(-1)
        kept = got != 0
        n_keep = flat.size if rule.topk >= 1 else max(1, int(np.ceil(rule.topk * flat.size)))
        if rule.topk < 1:
            assert kept.sum() <= n_keep
            dropped = np.ones(flat.size, bool)
            dropped[np.argsort(-np.abs(flat), kind="stable")[:n_keep]] = False
            # top-k: nothing dropped is larger than what was kept (ties aside)
            if dropped.any():
                assert np.abs(flat[dropped]).max() <= np.sort(np.abs(flat))[-n_keep] + 1e-12
        if rule.bits == 32:
            sel = got != 0
            np.testing.assert_array_equal(got[sel], flat[sel])
        else:
            levels = 127 if rule.bits == 8 else 7
            bound = np.abs(flat).max() / levels * (1.0 if stochastic else 0.5)
            sel = got != 0
            assert np.all(np.abs(got[sel] - flat[sel]) <= bound * (1 + 1e-5) + 1e-30)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, BLOCK * 4).astype(np.float32)
    x[0] = 1.0  # pin the block scale
    trials = 4000
    acc = np.zeros_like(x, dtype=np.float64)
    for i in range(trials):
        q, s = quantize(x, 7, np.random.default_rng(i))
        acc += (q.astype(np.float32).reshape(-1, BLOCK) * s[:, None]).reshape(-1)
    mean = acc / trials
    step = 1.0 / 7
    # standard error of a {floor, ceil} draw is at most step/2/sqrt(trials)
    assert np.abs(mean - x).max() < 5 * step / 2 / np.sqrt(trials)
    nearest, s = quantize(x, 7, None)
    biased = (nearest.astype(np.float32).reshape(-1, BLOCK) * s[:, None]).reshape(-1)
    assert np.abs(biased - x).mean() > 10 * np.abs(mean - x).mean()  # round-to-nearest is visibly biased


def test_compression_ratio_of_the_default_uplink():
    t = {f"m.{i}.lora_A.weight": np.random.default_rng(i).standard_normal((8, 512)).astype(np.float32)
         for i in range(32)}
    payload, _ = encode(t, CodecPolicy(TensorRule(4, 0.05)), seed=0)
    assert sum(v.nbytes for v in t.values()) / len(payload) >= 32


def test_per_tensor_policy_keeps_sensitive_layers_exact():
    t = _tensors(3)
    sensitive = next(iter(t))
    policy = CodecPolicy(TensorRule(4, 0.1), CodecPolicy.parse_overrides([f"{sensitive}=32/1.0"]))
    out = decode(encode(t, policy, seed=0)[0], _exp(t), max_bytes=MAX)
    np.testing.assert_array_equal(out[sensitive], t[sensitive])
    with pytest.raises(ValueError, match="glob=bits/topk"):
        CodecPolicy.parse_overrides(["no-equals-sign"])


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda t: {**t, "extra": np.zeros(3, np.float32)}, "manifest lists"),
    (lambda t: {k + "x": v for k, v in t.items()}, "manifest does not match the adapter"),
    (lambda t: {k: v.reshape(-1) for k, v in t.items()}, "manifest does not match the adapter"),
])
def test_manifest_must_match_the_expected_adapter(mutate, needle):
    t = _tensors(4)
    payload, _ = encode(mutate(t), CodecPolicy(), seed=0)
    with pytest.raises(UpdateRejected, match=needle):
        decode(payload, _exp(t), max_bytes=MAX)


def test_non_finite_values_are_rejected_both_ways():
    t = _tensors(5)
    bad = {k: v.copy() for k, v in t.items()}
    next(iter(bad.values())).flat[0] = np.nan
    with pytest.raises(UpdateRejected, match="NaN"):
        encode(bad, CodecPolicy())
    payload = bytearray(encode(t, CodecPolicy(TensorRule(32, 1.0), (), 0), seed=0)[0])
    pos = payload.index(struct.pack("<f", float(next(iter(t.values())).flat[0])))
    payload[pos:pos + 4] = struct.pack("<f", float("inf"))
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        decode(bytes(payload), _exp(t), max_bytes=MAX)


def test_oversized_and_bomb_payloads_are_rejected_before_decompression():
    import zstandard

    t = _tensors(6)
    payload, _ = encode(t, CodecPolicy(), seed=0)
    with pytest.raises(UpdateRejected, match="over the"):
        decode(payload, _exp(t), max_bytes=len(payload) - 1)
    # a body that decompresses to far more than the manifest allows
    head_len = struct.unpack(">I", payload[7:11])[0]
    bomb = payload[:11 + head_len] + zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(UpdateRejected, match="larger than allowed|does not match|corrupt"):
        decode(bomb, _exp(t), max_bytes=MAX)


def test_fuzz_decoder_never_crashes_or_hangs():
    t = _tensors(7)
    expected = _exp(t)
    valid = [encode(t, CodecPolicy(r, (), z), seed=1)[0]
             for r in (TensorRule(8, 1.0), TensorRule(4, 0.1), TensorRule(32, 0.5)) for z in (0, 3)]
    rnd = random.Random(0)
    start = time.monotonic()
    for i in range(3000):
        base = bytearray(rnd.choice(valid))
        op = i % 5
        if op == 0:
            base[rnd.randrange(len(base))] ^= 1 << rnd.randrange(8)
        elif op == 1:
            del base[rnd.randrange(len(base)):]
        elif op == 2:
            pos = rnd.randrange(len(base))
            base[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 16)))
        elif op == 3:
            base = bytearray(rnd.randbytes(rnd.randrange(0, 400)))
            if rnd.random() < 0.5:
                base[:6] = b"FSUPD\x01"
        else:
            for _ in range(rnd.randrange(1, 6)):
                base[rnd.randrange(len(base))] = rnd.randrange(256)
        try:
            out = decode(bytes(base), expected, max_bytes=MAX)
        except UpdateRejected:
            continue
        # the rare mutation that still decodes must still be a well-formed, finite adapter
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in t.items()}
        assert all(np.all(np.isfinite(v)) for v in out.values())
    assert time.monotonic() - start < 60


def test_downlink_tracks_what_each_site_holds():
    ts = TransportSettings(downlink_bits=8)
    tracker = DownlinkTracker(ts)
    g0, g1 = _tensors(8), _tensors(9)
    p0, base0 = tracker.payload_for(7, g0, seed=0)
    assert base0 == NO_BASE
    held = site_receive(p0, base0, None, g0, ts)
    np.testing.assert_array_equal(held["m.0.lora_A.weight"], tracker.views[7]["m.0.lora_A.weight"])
    p1, base1 = tracker.payload_for(7, g1, seed=1)
    assert len(p1) > 0 and base1 != NO_BASE
    held = site_receive(p1, base1, held, g0, ts)
    for k in g1:
        np.testing.assert_array_equal(held[k], tracker.views[7][k])  # both ends agree exactly
    with pytest.raises(Exception, match="resend-full"):
        site_receive(p1, base1, None, g0, ts)  # a site that lost its copy asks for a keyframe
    assert RESEND_FULL in "[fedsecure:resend-full-adapter]"


def test_downlink_encodes_once_per_distinct_base():
    ts = TransportSettings(downlink_bits=8)
    tracker = DownlinkTracker(ts)
    g0, g1 = _tensors(11), _tensors(12)
    first = [tracker.payload_for(n, g0, seed=0) for n in (1, 2, 3)]
    assert tracker.encodes == 1 and len({p for p, _ in first}) == 1  # three sites, one keyframe
    held = site_receive(*first[0], None, g0, ts)
    tracker.forget(3)  # site 3 lost its copy: it needs a keyframe, the others a delta
    second = [tracker.payload_for(n, g1, seed=1) for n in (1, 2, 3)]
    assert tracker.encodes == 3  # one delta for sites 1 and 2, one keyframe for site 3
    assert second[0] == second[1] and second[2][1] == NO_BASE
    site1 = site_receive(*second[0], held, g0, ts)
    site3 = site_receive(*second[2], None, g0, ts)
    for k in g1:  # each site reconstructs exactly what the coordinator believes it holds
        np.testing.assert_array_equal(site1[k], tracker.views[1][k])
        np.testing.assert_array_equal(site3[k], tracker.views[3][k])


def test_error_feedback_carries_what_compression_dropped():
    ts = TransportSettings(uplink_bits=4, uplink_topk=0.05)
    delta = _tensors(10)
    payload, residual = site_encode(delta, None, ts, seed=0)
    sent = decode(payload, _exp(delta), max_bytes=MAX)
    for k in delta:
        np.testing.assert_allclose(sent[k] + residual[k], delta[k], rtol=1e-5, atol=1e-7)
    # with error feedback, the sum of what arrives over rounds tracks the sum of deltas
    total_sent = {k: np.zeros_like(v) for k, v in delta.items()}
    res = None
    for r in range(30):
        p, res = site_encode(delta, res, ts, seed=r)
        out = decode(p, _exp(delta), max_bytes=MAX)
        for k in delta:
            total_sent[k] += out[k]
    for k in delta:
        drift = np.abs(total_sent[k] - 30 * delta[k]).max()
        assert drift <= np.abs(res[k]).max() + 1e-4  # the gap is exactly the residual still held back


# --------------------------------------------------------------------------- in the federation
from .conftest import small_config  # noqa: E402


def test_a_malformed_update_is_rejected_and_the_round_goes_on(site_data, tmp_path, monkeypatch):
    import fedsecure.federation.client as client
    from fedsecure.simulation import simulate

    real = client._encode_update

    def garbage_from_site_1(context, cfg, name, run_id, delta, seed):
        payload = real(context, cfg, name, run_id, delta, seed)
        return payload[:20] + b"\xff" * 40 if name == "site-1" else payload

    monkeypatch.setattr(client, "_encode_update", garbage_from_site_1)
    summary = simulate(small_config(site_data), run_dir=tmp_path / "run")
    r1 = summary["rounds"][1]
    assert r1["sites_ok"] == 1
    assert any("update rejected" in v for v in r1["failures"].values())
    assert summary["final_eval_loss"] is not None


def test_bytes_on_the_wire_are_a_small_fraction_of_fp32(site_data, tmp_path):
    import json

    from fedsecure.simulation import simulate

    for topk, ratio in ((1.0, 6), (0.05, 30)):  # default dense int4; the slow-link setting
        run = tmp_path / f"run-{topk}"
        simulate(small_config(site_data, transport={"uplink_topk": topk}), run_dir=run)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        sites = [x for x in lines if x["round"] == 1 and x["site"] != "federation"]
        assert len(sites) == 2
        for x in sites:
            assert x["fp32_bytes"] / x["bytes_up"] >= ratio, (topk, x)
            assert x["bytes_down"] < x["fp32_bytes"]  # keyframe (int8) plus evaluate
