"""Secure aggregation, the protocol alone (fedsecure/secagg): exact sums, dropouts, refusals, what leaks."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure.errors import SecAggError
from fedsecure.secagg import masking, shamir
from fedsecure.secagg.coordinator import Aggregation
from fedsecure.secagg.protocol import RoundSpec, loads, sign_advert
from fedsecure.secagg.site import SiteSecAgg

PHASES = ("advertise", "share", "masked input", "consistency", "unmask")


def _setup(n: int = 5, t: int = 3, length: int = 64, bits: int = 24, rnd: int = 1, keys=None):  # noqa: ANN001
    keys = keys or {i: Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    roster = {i: k.public_key() for i, k in keys.items()}
    spec = RoundSpec("run-a", rnd, tuple(sorted(keys)), t, length, bits)
    sites = {i: SiteSecAgg(i, spec, keys[i], roster) for i in keys}
    return spec, keys, roster, sites, Aggregation(spec, roster)


def _inputs(spec: RoundSpec, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(-1000, 1001, spec.length) for i in spec.sites}


def _run(sites, agg, xs, drop=None):  # noqa: ANN001, ANN202
    """One round; ``drop``: phase number (1-5) -> sites that stop answering from that phase on."""
    drop = drop or {}
    gone: set[int] = set()

    def live(phase: int, among) -> list[int]:  # noqa: ANN001
        gone.update(drop.get(phase, ()))
        return [i for i in among if i not in gone]

    adverts = agg.adverts({i: sites[i].advertise() for i in live(1, sites)})
    routed = agg.route({i: sites[i].share(adverts) for i in live(2, adverts)})
    u3 = agg.masked({i: sites[i].masked_input(routed[i], xs[i]) for i in live(3, routed)})
    sigs = agg.signatures({i: sites[i].consistency(u3) for i in live(4, u3)})
    return agg.unmask({i: sites[i].unmask(sigs) for i in live(5, sigs)}), u3


def test_the_sum_is_exactly_the_sum_of_the_inputs():
    spec, _, _, sites, agg = _setup()
    xs = _inputs(spec)
    total, u3 = _run(sites, agg, xs)
    assert u3 == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(total, sum(xs.values()))
    assert agg.refused == {}


@pytest.mark.parametrize("phase", [1, 2, 3, 4, 5])
def test_dropouts_up_to_the_tolerance_in_each_phase_give_the_right_sum(phase):
    spec, _, _, sites, agg = _setup(n=5, t=3)
    xs = _inputs(spec, phase)
    total, u3 = _run(sites, agg, xs, drop={phase: {2, 5}})
    # sites dropped before their masked input arrived are not in the sum; after it, they are
    assert u3 == ([1, 3, 4] if phase <= 3 else [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(total, sum(xs[i] for i in u3))


@pytest.mark.parametrize("phase", [1, 2, 3, 4, 5])
def test_beyond_the_tolerance_the_round_is_refused_cleanly(phase):
    spec, _, _, sites, agg = _setup(n=5, t=3)
    with pytest.raises(SecAggError, match=f"refused in the {PHASES[phase - 1]} phase: 2 sites left, 3 needed"):
        _run(sites, agg, _inputs(spec), drop={phase: {2, 4, 5}})


def _routed(sites, agg):  # noqa: ANN001, ANN202
    adverts = agg.adverts({i: sites[i].advertise() for i in sites})
    return adverts, agg.route({i: sites[i].share(adverts) for i in sites})


def test_a_swapped_public_key_is_refused_by_the_site_and_by_the_coordinator():
    spec, keys, _, sites, agg = _setup(n=3, t=2)
    adverts = {i: sites[i].advertise() for i in sites}
    forger = Ed25519PrivateKey.generate()  # the coordinator's own key pair in place of site 2's
    forged = sign_advert(forger, spec, 2, b"\1" * 32, b"\2" * 32, b"\3" * 32)
    with pytest.raises(SecAggError, match="not signed by site 2's node key .* swapped public key"):
        sites[1].share({**adverts, 2: forged})
    agg.adverts({**adverts, 2: forged})
    assert "swapped public key" in agg.refused[2]
    # a site's own advert replaced (by another genuine one of its own, from another session) is noticed by that site
    _, _, _, other, _ = _setup(n=3, t=2, keys=keys)
    genuine = {i: other[i].advertise() for i in other}
    with pytest.raises(SecAggError, match="another advert in place of this site's own"):
        other[1].share({**genuine, 1: adverts[1]})


def test_a_share_replayed_from_another_round_or_sent_to_another_site_is_refused():
    keys = {i: Ed25519PrivateKey.generate() for i in (1, 2, 3)}
    _, _, _, sites1, agg1 = _setup(n=3, t=2, keys=keys, rnd=1)
    _, routed1 = _routed(sites1, agg1)
    spec2, _, _, sites2, agg2 = _setup(n=3, t=2, keys=keys, rnd=2)
    _, routed2 = _routed(sites2, agg2)
    with pytest.raises(SecAggError, match="from site 2 to site 1 do not decrypt for this round .*replayed"):
        sites2[1].masked_input({**routed2[1], 2: routed1[1][2]}, np.zeros(spec2.length, np.int64))
    _, _, _, sites3, agg3 = _setup(n=3, t=2, keys=keys, rnd=3)
    _, routed3 = _routed(sites3, agg3)
    with pytest.raises(SecAggError, match="from site 2 to site 1 do not decrypt"):  # site 2's shares for site 3
        sites3[1].masked_input({**routed3[1], 2: routed3[3][2]}, np.zeros(spec2.length, np.int64))


def test_a_wrong_length_masked_vector_is_refused_with_its_reason_and_the_round_goes_on():
    spec, _, _, sites, agg = _setup(n=4, t=3)
    xs = _inputs(spec)
    _, routed = _routed(sites, agg)
    masked = {i: sites[i].masked_input(routed[i], xs[i]) for i in sites}
    masked[2] = masked[2][:-3]
    u3 = agg.masked(masked)
    assert u3 == [1, 3, 4] and "masked vector of" in agg.refused[2] and "expected" in agg.refused[2]
    sigs = agg.signatures({i: sites[i].consistency(u3) for i in u3})
    total = agg.unmask({i: sites[i].unmask(sigs) for i in u3})
    np.testing.assert_array_equal(total, xs[1] + xs[3] + xs[4])


def _unmask_replies(n: int, t: int):  # noqa: ANN202
    spec, _, _, sites, agg = _setup(n=n, t=t)
    xs = _inputs(spec)
    adverts = agg.adverts({i: sites[i].advertise() for i in sites})
    routed = agg.route({i: sites[i].share(adverts) for i in sites})
    u3 = agg.masked({i: sites[i].masked_input(routed[i], xs[i]) for i in sites})
    sigs = agg.signatures({i: sites[i].consistency(u3) for i in u3})
    return xs, agg, {i: sites[i].unmask(sigs) for i in u3}


def _tamper(reply: bytes, about: str, how) -> bytes:  # noqa: ANN001
    import json

    doc = json.loads(reply)
    doc["b"][about] = how(doc["b"][about])
    return json.dumps(doc).encode()


def test_a_malformed_or_altered_share_is_named_and_outvoted_or_refuses_the_round():
    flip = lambda h: h[:-2] + format(int(h[-2:], 16) ^ 1, "02x")  # noqa: E731 - one bit of the share's value
    xs, agg, replies = _unmask_replies(n=5, t=3)
    replies[4] = _tamper(replies[4], "1", flip)
    replies[5] = _tamper(replies[5], "2", lambda h: h[:10])  # malformed: too short
    total = agg.unmask(replies)
    np.testing.assert_array_equal(total, sum(xs.values()))  # outvoted: the others' shares reconstruct
    assert "malformed field" in agg.refused[5]
    assert "share of site 1's self-mask seed is wrong" in agg.refused[4]
    # with exactly the threshold and one altered share, nothing is released
    xs, agg, replies = _unmask_replies(n=3, t=3)
    replies[2] = _tamper(replies[2], "3", flip)
    with pytest.raises(SecAggError, match="reconstruct the secret it committed to"):
        agg.unmask(replies)


def test_a_site_unmasks_only_after_threshold_signatures_over_one_list():
    spec, _, _, sites, agg = _setup(n=4, t=3)
    xs = _inputs(spec)
    _, routed = _routed(sites, agg)
    u3 = agg.masked({i: sites[i].masked_input(routed[i], xs[i]) for i in sites})
    # a coordinator that tells site 1 that sites 3 and 4 dropped (to learn their mask keys) is refused
    with pytest.raises(SecAggError, match="2 sites survive, 3 needed"):
        sites[1].consistency([1, 2])
    sigs = {i: sites[i].consistency(u3) for i in (2, 3, 4)}
    with pytest.raises(SecAggError, match="out of order"):
        sites[1].unmask(sigs)  # site 1 refused to sign: its session is closed for the round
    with pytest.raises(SecAggError, match="2 valid signatures"):
        sites[2].unmask({2: sigs[2], 3: sigs[3]})


def test_different_lists_for_different_sites_are_caught():
    spec, _, _, sites, agg = _setup(n=5, t=3)
    xs = _inputs(spec)
    adverts = agg.adverts({i: sites[i].advertise() for i in sites})
    routed = agg.route({i: sites[i].share(adverts) for i in sites})
    agg.masked({i: sites[i].masked_input(routed[i], xs[i]) for i in sites})
    sig_a = {i: sites[i].consistency([1, 2, 3, 4, 5]) for i in (1, 2)}
    sig_b = {i: sites[i].consistency([1, 3, 4]) for i in (3, 4)}
    with pytest.raises(SecAggError, match="not over the list of surviving sites"):
        sites[1].unmask({**sig_a, **sig_b})


def test_every_masked_message_looks_uniform_whatever_one_sites_input():
    from scipy import stats

    seen = {}
    for label, big in (("zeros", False), ("large", True)):
        spec, _, _, sites, agg = _setup(n=3, t=2, length=20000, bits=16)
        xs = {i: np.zeros(spec.length, np.int64) for i in spec.sites}
        if big:
            xs[1] = np.full(spec.length, 30000, np.int64)  # site 1's input replaced by another
        adverts = agg.adverts({i: sites[i].advertise() for i in sites})
        routed = agg.route({i: sites[i].share(adverts) for i in sites})
        msgs = {i: sites[i].masked_input(routed[i], xs[i]) for i in sites}
        seen[label] = {i: masking.unpack(m, spec.length, spec.bits, "m") for i, m in msgs.items()}
    for label, by_site in seen.items():
        for i, y in by_site.items():
            counts = np.bincount((y >> np.uint64(12)).astype(np.int64), minlength=16)
            assert stats.chisquare(counts).pvalue > 1e-4, (label, i)  # uniform on the ring
    for i in (1, 2, 3):  # and indistinguishable between the two inputs
        assert stats.ks_2samp(seen["zeros"][i].astype(float), seen["large"][i].astype(float)).pvalue > 1e-4, i


def test_a_site_reveals_one_secret_per_peer_and_the_coordinator_refuses_a_reply_that_reveals_more():
    import json

    xs, agg, replies = _unmask_replies(n=4, t=3)
    for reply in replies.values():
        doc = json.loads(reply)
        assert not set(doc["b"]) & set(doc["s"])
    doc = json.loads(replies[1])
    doc["s"] = {"2": doc["b"]["2"]}  # an s_sk share of a survivor: would unmask its pairwise masks
    agg.unmask({**replies, 1: json.dumps(doc).encode()})
    assert "reveals a secret it must not" in agg.refused[1]
    assert loads(replies[2], "r", {"site", "b", "s"})["site"] == 2


def test_shamir_any_threshold_subset_recovers_and_fewer_are_refused():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine({k: shares[k] for k in (5, 2, 4)}, 3, "s") == secret
    assert shamir.combine({k: shares[k] for k in (1, 3, 4)}, 3, "s") == secret
    with pytest.raises(SecAggError, match="2 shares, 3 needed"):
        shamir.combine({k: shares[k] for k in (1, 2)}, 3, "s")
    with pytest.raises(SecAggError, match="malformed share"):
        shamir.combine({1: shares[1][:-1], 2: shares[2], 3: shares[3]}, 3, "s")
    with pytest.raises(SecAggError, match="malformed share"):
        shamir.combine({1: b"\0\0" + shares[1][2:], 2: shares[2], 3: shares[3]}, 3, "s")  # point 0


def test_the_modulus_holds_the_largest_sum_and_packing_is_exact():
    bits = masking.modulus_bits(7, 3 * 500)
    assert 2 * 7 * 1500 < 1 << bits <= 4 * 2 * 7 * 1500
    with pytest.raises(SecAggError, match="Fix: cap the weights"):
        masking.modulus_bits(1 << 40, 1 << 30)
    rng = np.random.default_rng(0)
    for b in (2, 13, 24, 62):
        v = rng.integers(0, 1 << b, 1001, dtype=np.uint64)
        data = masking.pack(v, b)
        assert len(data) == masking.packed_size(1001, b) < 8 * 1001
        np.testing.assert_array_equal(masking.unpack(data, 1001, b, "v"), v)
    # the layout: value i at stream bits i*b.., LSB first
    for b, n in ((5, 1), (13, 63), (14, 64), (31, 65), (62, 130)):
        v = rng.integers(0, 1 << b, n, dtype=np.uint64)
        bitmat = ((v[:, None] >> np.arange(b, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
        assert masking.pack(v, b) == np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()
    with pytest.raises(SecAggError, match="bits set past its last value"):
        masking.unpack(b"\xff\xff", 3, 5, "v")  # 15 bits of values, the 16th set
    x = rng.integers(-(1 << 22), 1 << 22, 100)
    np.testing.assert_array_equal(masking.from_ring(masking.to_ring(x, 24), 24), x)
    with pytest.raises(SecAggError, match="does not fit the 24-bit modulus"):
        masking.to_ring(np.array([1 << 23]), 24)


def test_round_spec_refuses_a_minority_threshold():
    with pytest.raises(SecAggError, match="a majority"):
        RoundSpec("r", 1, (1, 2, 3, 4), 2, 10, 16)
    with pytest.raises(SecAggError, match="distinct, sorted"):
        RoundSpec("r", 1, (2, 1, 3), 2, 10, 16)


def test_a_session_saved_between_messages_goes_on_where_it_stopped():
    spec, keys, roster, sites, agg = _setup(n=3, t=2)
    xs = _inputs(spec)

    def again(i: int) -> SiteSecAgg:  # every message: restore, act, save (what the ClientApp does)
        sites[i] = SiteSecAgg.from_bytes(sites[i].to_bytes(), keys[i], roster)
        return sites[i]

    adverts = agg.adverts({i: again(i).advertise() for i in sites})
    routed = agg.route({i: again(i).share(adverts) for i in sites})
    u3 = agg.masked({i: again(i).masked_input(routed[i], xs[i]) for i in sites})
    sigs = agg.signatures({i: again(i).consistency(u3) for i in u3})
    total = agg.unmask({i: again(i).unmask(sigs) for i in u3})
    np.testing.assert_array_equal(total, sum(xs.values()))
