"""Attestation inside real rounds (in-process Flower grid): dishonest sites are rejected, each for its own
reason, the audit log records every decision, and the round goes on with the honest sites."""

from __future__ import annotations

import json

import pytest

from fedsecure.attestation.evidence import code_hash
from fedsecure.attestation.policy import MinDP, Policy
from fedsecure.attestation.protocol import dp_config_document
from fedsecure.attestation.providers import SoftwareProvider
from fedsecure.audit import verify_log
from fedsecure.data.synth import synthesize
from fedsecure.federation import coordinator, keys
from fedsecure.federation import site as client
from fedsecure.launch.simulate import simulate

from .conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")

MODES = {"site-1": "replay", "site-2": "other-site-nonce", "site-3": "other-node-key", "site-4": "weaker-dp",
         "site-5": "unlisted-measurement", "site-6": "no-evidence"}


@pytest.fixture
def dishonest_sites(monkeypatch, tmp_path):
    """Patch the site side so that site-1..site-6 each cheat in one way (site-0 stays honest)."""
    issued: dict[tuple[int, int], bytes] = {}  # (round, node) -> nonce, as the coordinator sent them
    seen: dict[str, bytes] = {}
    current: dict[str, str] = {}
    real_messages, real_attester, real_statement = (coordinator.Coordinator._messages, client._attester,
                                                    client.site_statement)

    def messages(self, nodes, kind, state, server_round, challenge=False):
        msgs = real_messages(self, nodes, kind, state, server_round, challenge)
        for m in msgs:
            nonce = m.content[keys.CONFIG].get(keys.ATTEST_NONCE)
            if nonce is not None:
                issued[(server_round, m.metadata.dst_node_id)] = nonce
        return msgs

    def attester(msg, site, name):
        att = real_attester(msg, site, name)
        current["site"] = name
        mode = MODES.get(name)
        server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
        nonce, provider, key = att
        if mode == "no-evidence":
            return None
        if mode == "replay":
            previous = seen.get(name)
            seen[name] = nonce
            return (previous or nonce), provider, key  # round 1 honest, round 2 replays round 1
        if mode == "other-site-nonce":
            other = next(n for (r, node), n in sorted(issued.items()) if r == server_round and n != nonce)
            return other, provider, key
        if mode == "unlisted-measurement":
            return nonce, SoftwareProvider(tmp_path / "rogue.pem", measurement="ab" * 32), key
        return att

    def statement(provider, node_key, nonce, dp_config, digest):
        mode = MODES.get(current.get("site", ""))
        if mode == "weaker-dp":  # runs (and honestly attests) a budget the policy does not allow
            dp_config = dp_config_document(**{**json.loads(dp_config), "epsilon_budget": 50.0})
        st = real_statement(provider, node_key, nonce, dp_config, digest)
        if mode == "other-node-key":
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            other = real_statement(provider, Ed25519PrivateKey.generate(), nonce, dp_config, digest)
            st = {**other, "evidence": st["evidence"]}  # evidence bound to the real key, another key presented
        return st

    monkeypatch.setattr(coordinator.Coordinator, "_messages", messages)
    monkeypatch.setattr(client, "_attester", attester)
    monkeypatch.setattr(client, "site_statement", statement)


@pytest.mark.slow
def test_dishonest_sites_are_rejected_and_the_round_goes_on(tmp_path, dishonest_sites):
    data = tmp_path / "data"
    synthesize(data, sites=7, records_per_site=40, eval_fraction=0.2, seed=11)
    cfg = small_config(data, federation={"sites": 7, "rounds": 2}, train={"local_steps": 2})
    policy = Policy(measurements={"software": (code_hash(),)}, code=(code_hash(),),
                    min_dp=MinDP(epsilon_budget=3.0, delta=1e-5, secure_noise=False))  # seeded test sites
    (tmp_path / "policy.yaml").write_text(policy.to_yaml())
    cfg = type(cfg).from_mapping({**cfg.to_dict(), "attestation": {"policy": str(tmp_path / "policy.yaml")}})
    summary = simulate(cfg, run_dir=tmp_path / "run")

    r1, r2 = summary["rounds"][1], summary["rounds"][2]
    assert r1["sites_ok"] == 2 and r2["sites_ok"] == 1  # site-0, plus site-1 until it replays
    assert r1["attestation"]["site-0"].startswith("verified (software")
    assert r1["attestation"]["site-1"].startswith("verified") and r2["attestation"]["site-1"].startswith("rejected")
    expected = {"site-2": "issued to another site", "site-3": "REPORT_DATA does not match",
                "site-4": "epsilon_budget=50 breaks min_dp.epsilon_budget=3",
                "site-5": "not in the policy's allow-list", "site-6": "sent no attestation evidence"}
    for rnd in (r1, r2):
        for site, reason in expected.items():
            assert reason in rnd["failures"][site], (site, rnd["failures"][site])
    assert "already used: replayed evidence" in r2["failures"]["site-1"]
    assert summary["rounds_completed"] == 2 and summary["final_eval_loss"] is not None

    count, head = verify_log(tmp_path / "run" / "audit.log")
    assert summary["attestation"]["audit_head"] == head and count == summary["attestation"]["audit_entries"]
    events = [json.loads(x) for x in (tmp_path / "run" / "audit.log").read_text().splitlines()]
    rejected = [(e["round"], e["site"]) for e in events if e["event"] == "attestation.rejected"]
    assert sorted(rejected) == sorted([(1, s) for s in expected] + [(2, s) for s in [*expected, "site-1"]])
    accepted = [(e["round"], e["site"]) for e in events if e["event"] == "attestation.accepted"]
    assert sorted(accepted) == [(1, "site-0"), (1, "site-1"), (2, "site-0")]
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "## Attestation" in md and "| 2 | site-1 | rejected: the nonce was already used" in md


@pytest.mark.slow
def test_retire_site_policy_stops_asking_a_failing_site(tmp_path, monkeypatch, site_data):
    real_attester = client._attester
    monkeypatch.setattr(client, "_attester", lambda msg, site, name: None if name == "site-1"
                        else real_attester(msg, site, name))
    policy = Policy(measurements={"software": (code_hash(),)}, code=(code_hash(),), on_failure="retire-site")
    (tmp_path / "policy.yaml").write_text(policy.to_yaml())
    cfg = small_config(site_data, federation={"rounds": 2}, train={"local_steps": 2},
                       attestation={"policy": str(tmp_path / "policy.yaml")})
    summary = simulate(cfg, run_dir=tmp_path / "run")
    r1, r2 = summary["rounds"][1], summary["rounds"][2]
    assert r1["refused"] == ["site-1"] and "sent no attestation evidence" in r1["failures"]["site-1"]
    assert "site-1" not in r2["failures"] and set(r2["attestation"]) == {"site-0"}
    events = [json.loads(x)["event"] for x in (tmp_path / "run" / "audit.log").read_text().splitlines()]
    assert "site.retired" in events


def test_coordinator_without_a_policy_refuses_to_start(tmp_path, site_data):
    from fedsecure.errors import ConfigError
    from fedsecure.store.rundir import RunDir

    cfg = small_config(site_data)  # attestation on, no policy (simulate would generate one)
    with pytest.raises(ConfigError, match="attestation.policy is not set"):
        coordinator.Coordinator(cfg, RunDir(tmp_path / "run"))
