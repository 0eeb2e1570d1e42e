"""Secure aggregation inside the federation: simulate with federation.secure_aggregation on."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedsecure.federation.secagg_round as secagg_round
import fedsecure.federation.secagg_site as secagg_site
from fedsecure.errors import ConfigError, SecAggError
from fedsecure.launch.simulate import simulate
from fedsecure.secagg.quantize import mean as true_mean

from .conftest import global_adapter, small_config


def _cfg(tmp_path, sites=3, dropouts=1, **sections):  # noqa: ANN001, ANN202
    return small_config(federation={"sites": sites, "rounds": 1,
                                    "secure_aggregation": {"enabled": True, "dropouts": dropouts}}, **sections)


def _audit(run) -> list[dict]:  # noqa: ANN001
    return [json.loads(x) for x in (run / "audit.log").read_text().splitlines()]


def test_the_coordinators_sum_is_exactly_fedavg_of_the_quantized_updates(tmp_path, monkeypatch):
    sent, got = {}, {}
    quantize = secagg_site.quantize

    def spy_quantize(delta, steps, levels, seed, weight):  # noqa: ANN001, ANN202
        x = quantize(delta, steps, levels, seed, weight)
        sent[seed] = (weight, x.copy(), steps)
        return x

    def spy_mean(total, seeds, weights, steps, shapes):  # noqa: ANN001, ANN202
        got.update(total=total.copy(), seeds=dict(seeds), weights=dict(weights))
        out = true_mean(total, seeds, weights, steps, shapes)
        got["mean"] = out
        return out

    monkeypatch.setattr(secagg_site, "quantize", spy_quantize)
    monkeypatch.setattr(secagg_round, "mean", spy_mean)
    run = tmp_path / "run"
    simulate(_cfg(tmp_path), run_dir=run, announce=lambda *_: None)
    assert len(sent) == 3 and sorted(got["seeds"]) == ["site-0", "site-1", "site-2"]
    # the integer sum the coordinator unmasked is the sum of what the sites quantized, exactly
    np.testing.assert_array_equal(got["total"], sum(x for _, x, _ in sent.values()))
    # and the update it applied is FedAvg of each site's dequantized values
    from fedsecure.transport.stages import dither_stream

    steps = next(iter(sent.values()))[2]
    per_site = []
    for seed, (w, x, _) in sent.items():
        u = dither_stream(seed, x.size).astype(np.float64)
        per_site.append((w, x / w - u))
    fedavg = sum(w * v for w, v in per_site) / sum(w for w, _ in per_site)
    flat = np.concatenate([got["mean"][k].reshape(-1) for k in sorted(got["mean"])])
    scale = np.concatenate([np.full(got["mean"][k].size, steps[k]) for k in sorted(got["mean"])])
    np.testing.assert_allclose(flat, (fedavg * scale).astype(np.float32), rtol=1e-6, atol=1e-9)
    before, after = global_adapter(run, 0), global_adapter(run, 1)
    for k in after:
        np.testing.assert_allclose(after[k] - before[k], got["mean"][k], atol=1e-6)
    agg = [e for e in _audit(run) if e["event"] == "round.aggregated"]
    assert agg[0]["secure_aggregation"] is True and agg[0]["sites"] == ["site-0", "site-1", "site-2"]
    assert "only the weighted sum" in (run / "report.md").read_text()


def _fail(monkeypatch, site: str, phase: str) -> None:
    real = secagg_site._phase

    def phase_fails(msg, context, r, session, head, ph, body, node_key):  # noqa: ANN001, ANN202
        if r.name == site and ph == phase:
            raise SecAggError(f"{site} lost its network in phase {ph}")
        return real(msg, context, r, session, head, ph, body, node_key)

    monkeypatch.setattr(secagg_site, "_phase", phase_fails)


@pytest.mark.parametrize(("phase", "in_sum"), [("masked", False), ("consistency", True)])
def test_a_site_that_drops_mid_protocol_is_recovered_and_named(tmp_path, monkeypatch, phase, in_sum):
    _fail(monkeypatch, "site-1", phase)
    run = tmp_path / "run"
    summary = simulate(_cfg(tmp_path), run_dir=run, announce=lambda *_: None)
    assert summary.get("stopped") is None
    agg = [e for e in _audit(run) if e["event"] == "round.aggregated"][0]
    # dropped before its masked vector: left out (its masks removed); after: in the sum (its seed recovered)
    assert ("site-1" in agg["sites"]) is in_sum and {"site-0", "site-2"} <= set(agg["sites"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    failure = json.dumps(rows)
    assert "site-1 lost its network" in failure


def test_beyond_the_tolerance_the_round_is_refused_and_nothing_is_aggregated(tmp_path, monkeypatch):
    _fail(monkeypatch, "site-1", "masked")
    run = tmp_path / "run"
    summary = simulate(_cfg(tmp_path, dropouts=0), run_dir=run, announce=lambda *_: None)
    assert "secure aggregation refused" in str(summary.get("stopped"))
    events = _audit(run)
    refused = [e for e in events if e["event"] == "secagg.refused"]
    assert "3 needed" in refused[0]["reason"] and "site-1 lost its network" in refused[0]["reason"]
    assert not any(e["event"] == "round.aggregated" for e in events)
    assert not (run / "adapters" / "global-round-0001.safetensors").exists() and \
        not any(p.name.startswith("global-round-0001") for p in (run / "adapters").iterdir())
    # the sites' spend is on record all the same (ledger before release: nothing was under-reported)
    privacy = json.loads((run / "privacy.json").read_text())
    assert all(s["epsilon_spent"] > 0 and s["rounds_trained"] == [1] for s in privacy["sites"].values())


def test_a_roster_key_that_is_not_the_sites_node_key_excludes_that_site_by_name(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedsecure.secagg.roster import write_roster

    roster = write_roster(tmp_path / "roster.yaml", {f"site-{i}": Ed25519PrivateKey.generate().public_key()
                                                     for i in range(3)})
    run = tmp_path / "run"
    cfg = small_config(federation={"sites": 3, "rounds": 1, "secure_aggregation": {
        "enabled": True, "dropouts": 1, "roster": str(roster)}})
    summary = simulate(cfg, run_dir=run, announce=lambda *_: None)
    # no site's node key is the roster's: every one is excluded, by name and reason, and the round refused
    assert "secure aggregation refused" in str(summary.get("stopped"))
    rows = json.dumps([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])
    assert "its roster key is not the node key its attestation evidence binds" in rows


def _client_dp(tmp_path, **kw):  # noqa: ANN001, ANN202
    return _cfg(tmp_path, privacy={"client_dp": {"enabled": True, "clip": 0.5, "noise_multiplier": 0.9}}, **kw)


def test_client_level_dp_under_secure_aggregation_adds_the_noise_at_the_sites(tmp_path, monkeypatch):
    from fedsecure.privacy import distributed

    sent, got = [], {}
    encode, decode = secagg_site.ddg.encode, secagg_round.ddg.decode

    def spy_encode(delta, params, rng=None):  # noqa: ANN001, ANN202
        x = encode(delta, params, rng)
        sent.append((x.copy(), params))
        return x

    def spy_decode(total, params, denominator, shapes):  # noqa: ANN001, ANN202
        got.update(total=total.copy(), params=params, denominator=denominator)
        got["mean"] = decode(total, params, denominator, shapes)
        return got["mean"]

    monkeypatch.setattr(secagg_site.ddg, "encode", spy_encode)
    monkeypatch.setattr(secagg_round.ddg, "decode", spy_decode)
    run = tmp_path / "run"
    simulate(_client_dp(tmp_path), run_dir=run, announce=lambda *_: None)
    # every site noised its own vector with the announced parameters; the coordinator unmasked their exact sum
    assert len(sent) == 3 and all(p == got["params"] for _, p in sent)
    np.testing.assert_array_equal(got["total"], sum(x for x, _ in sent))
    params = got["params"]
    assert params.clip == 0.5 and got["denominator"] == 3
    # threshold 2 of 3: each site's share is the central variance over 2, so any released sum has at least it
    assert params.sigma == pytest.approx(0.9 * params.l2 / np.sqrt(2))
    before, after = global_adapter(run, 0), global_adapter(run, 1)
    for k in after:
        np.testing.assert_allclose(after[k] - before[k], got["mean"][k], atol=1e-6)
    cl = json.loads((run / "summary.json").read_text())["privacy"]["client_level"]
    assert [r["sites_in_sum"] for r in cl["per_round"]] == [3]
    assert cl["per_round"][0]["rho"] == pytest.approx(params.rho(3))
    assert cl["epsilon"] == max(distributed.epsilon([params.rho(3)], 1e-5),
                                distributed.independent_epsilon([params.rho(3)], 1e-5)) > 0
    assert "noise is added at the sites" in (run / "report.md").read_text()
    # the releases are in the checkpoint, for a resumed run to go on counting from
    doc = json.loads((run / "coordinator-state.json").read_text())
    assert doc["client_dp_distributed"] == cl["per_round"]


def test_a_site_that_drops_before_masking_takes_its_noise_along_and_the_epsilon_says_so(tmp_path, monkeypatch):
    _fail(monkeypatch, "site-1", "masked")
    run = tmp_path / "run"
    simulate(_client_dp(tmp_path), run_dir=run, announce=lambda *_: None)
    cl = json.loads((run / "summary.json").read_text())["privacy"]["client_level"]
    r = cl["per_round"][0]
    assert r["sites_in_sum"] == 2 and r["sites_asked"] == 3
    # two sites' noise in the sum: the threshold's, so ρ is the central Gaussian's, larger than with all three
    assert r["rho"] == pytest.approx(1 / (2 * 0.9**2), rel=1e-6)


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_run(tmp_path):
    from fedsecure.privacy.policy import check_limits

    strict = small_config(site={"privacy": {"require_secure_aggregation": True}})
    refusal = check_limits(strict.site.privacy, strict.site.limits, strict)
    assert refusal is not None and refusal.key == "federation.secure_aggregation.enabled"
    assert "site.privacy.require_secure_aggregation" in refusal.reason and "Fix:" in refusal.reason
    with pytest.raises(ConfigError, match="require_secure_aggregation"):  # simulate checks before any work
        simulate(strict, run_dir=tmp_path / "plain", announce=lambda *_: None)
    run = tmp_path / "masked"
    summary = simulate(_cfg(tmp_path, sites=2, dropouts=0, site={"privacy": {"require_secure_aggregation": True}}),
                       run_dir=run, announce=lambda *_: None)
    assert summary.get("stopped") is None and summary["rounds_completed"] == 1


@pytest.mark.parametrize("phase", ["advertise", "share", "masked", "consistency", "unmask"])
def test_a_malformed_coordinator_message_gets_an_error_reply_not_a_crash(tmp_path, monkeypatch, phase):
    real = secagg_round._Exchange.__call__

    def garble(self, ph, bodies):  # noqa: ANN001, ANN202 - a coordinator that sends nonsense in one phase
        if ph == phase:
            bodies = {i: {"spec": 7, "adverts": [1], "shares": "x", "u3": {"a": 1}, "sigs": None, "levels": "?",
                          "steps": 0, "weights": []} for i in bodies}
        return real(self, ph, bodies)

    monkeypatch.setattr(secagg_round._Exchange, "__call__", garble)
    run = tmp_path / "run"
    summary = simulate(_cfg(tmp_path, sites=3, dropouts=1), run_dir=run, announce=lambda *_: None)
    assert "secure aggregation refused" in str(summary.get("stopped"))
    reason = [e for e in _audit(run) if e["event"] == "secagg.refused"][0]["reason"]
    assert f"secure aggregation ({phase})" in reason and ("malformed" in reason or "fields" in reason), reason


def test_a_site_refuses_a_round_smaller_than_its_minimum(tmp_path):
    run = tmp_path / "run"
    summary = simulate(_cfg(tmp_path, sites=2, dropouts=0, site={"privacy": {"secagg_min_sites": 3}}),
                       run_dir=run, announce=lambda *_: None)
    assert "secure aggregation refused" in str(summary.get("stopped"))
    reason = [e for e in _audit(run) if e["event"] == "secagg.refused"][0]["reason"]
    assert "fewer than this site's site.privacy.secagg_min_sites = 3" in reason
