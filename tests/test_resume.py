"""Coordinator crash recovery: a restart with the same run directory resumes after the last completed
round (global adapter, round counter, retired sites, privacy summary), and refuses a changed config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fedsecure.config import SimulationConfig
from fedsecure.errors import ConfigError
from fedsecure.federation import checkpoint, coordinator
from fedsecure.launch import engines
from fedsecure.launch.simulate import simulate

from .conftest import global_adapter, small_config

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_restarted_coordinator_resumes_after_the_last_completed_round(tmp_path, site_data, monkeypatch):
    cfg = small_config(site_data, federation={"rounds": 3}, train={"local_steps": 2})
    real = coordinator.weighted_mean
    calls = []

    def crash_in_round_2(updates):
        calls.append(len(updates))
        if len(calls) == 2:  # the second aggregation is round 2's
            raise Crash("coordinator killed during round 2")
        return real(updates)

    monkeypatch.setattr(coordinator, "weighted_mean", crash_in_round_2)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        simulate(cfg, run_dir=run)
    state = json.loads((run / checkpoint.CHECKPOINT).read_text())
    assert state["round"] == 1
    r1 = global_adapter(run, 1)
    monkeypatch.setattr(coordinator, "weighted_mean", real)

    prepared = SimulationConfig.from_mapping(yaml.safe_load((run / "config.yaml").read_text()))
    engines.run_inprocess_engine(prepared, run)
    summary = json.loads((run / "summary.json").read_text())
    assert [h["round"] for h in summary["rounds"]] == [0, 1, 2, 3]  # round 1 not repeated
    assert summary["rounds_completed"] == 3
    for name, a in global_adapter(run, 1).items():
        np.testing.assert_array_equal(a, r1[name])  # round 1's adapter untouched
    events = [json.loads(x)["event"] for x in (run / "audit.log").read_text().splitlines()]
    assert events.count("run.resumed") == 1
    site = summary["privacy"]["sites"]["site-0"]
    assert site["rounds_trained"] == [1, 2, 3]  # spends before the crash are kept (round 2 trained twice:
    # the site spent budget on the crashed attempt too, and its ledger says so)
    assert site["ledger_entries"] == 4

    changed = SimulationConfig.from_mapping({**prepared.to_dict(), "train": {**prepared.to_dict()["train"],
                                                                             "local_steps": 3}})
    with pytest.raises(ConfigError, match="holds a run with a different configuration"):
        engines.run_inprocess_engine(changed, run)


def test_a_damaged_checkpoint_is_refused_with_the_fix(tmp_path, site_data):
    from fedsecure.errors import FedSecureError
    from fedsecure.store.rundir import RunDir

    cfg = small_config(site_data, attestation={"enabled": False})
    run = RunDir(tmp_path / "run")
    (run.path / checkpoint.CHECKPOINT).write_text("{not json")
    with pytest.raises(FedSecureError, match="coordinator-state.json is damaged. Fix: restore it"):
        checkpoint.Checkpoint.read(run, cfg)
    (run.path / checkpoint.CHECKPOINT).write_text(json.dumps({"round": 2, "config_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="different configuration"):
        checkpoint.Checkpoint.read(run, cfg)


def test_coordinator_waits_for_sites_then_goes_on_with_fewer(tmp_path, site_data):
    from fedsecure.store.rundir import RunDir

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    cfg = small_config(site_data, federation={"sites": 2, "min_sites": 1, "join_timeout_s": 0.0},
                       attestation={"enabled": False})
    cfg = SimulationConfig.from_mapping({**cfg.to_dict(), "federation": {**cfg.to_dict()["federation"], "sites": 3}})
    coord = coordinator.Coordinator(cfg, RunDir(tmp_path / "run"))
    coord.books.wait_for_sites(TwoNodes())
    last = coord.audit.entries()[-1]
    assert last["event"] == "run.sites-connected" and (last["connected"], last["expected"]) == (2, 3)


@pytest.mark.slow
def test_a_coordinator_killed_mid_secure_aggregation_resumes_and_completes(tmp_path, site_data, monkeypatch):
    from fedsecure.secagg.coordinator import Aggregation

    cfg = small_config(site_data, federation={"rounds": 3, "secure_aggregation": {"enabled": True, "dropouts": 0}},
                       train={"local_steps": 2})
    real = Aggregation.unmask
    calls = []

    def crash_in_round_2(self, replies):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 2:  # round 2's unmasking: the sites have revealed their shares
            raise Crash("coordinator killed while unmasking round 2")
        return real(self, replies)

    monkeypatch.setattr(Aggregation, "unmask", crash_in_round_2)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        simulate(cfg, run_dir=run)
    assert json.loads((run / checkpoint.CHECKPOINT).read_text())["round"] == 1
    monkeypatch.setattr(Aggregation, "unmask", real)
    prepared = SimulationConfig.from_mapping(yaml.safe_load((run / "config.yaml").read_text()))
    engines.run_inprocess_engine(prepared, run)
    summary = json.loads((run / "summary.json").read_text())
    assert [h["round"] for h in summary["rounds"]] == [0, 1, 2, 3] and summary["rounds_completed"] == 3
    audit = [json.loads(x) for x in (run / "audit.log").read_text().splitlines()]
    agg = [e for e in audit if e["event"] == "round.aggregated"]
    assert [e["round"] for e in agg] == [1, 2, 3] and all(e["secure_aggregation"] for e in agg)
    site = summary["privacy"]["sites"]["site-0"]
    assert site["rounds_trained"] == [1, 2, 3] and site["ledger_entries"] == 4  # the crashed attempt's spend kept
