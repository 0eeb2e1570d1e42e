"""Federation: FedAvg weighting, the in-process grid, failures, determinism, and learning."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsecure.federation import keys
from fedsecure.federation.aggregate import Update, weighted_mean
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.launch.simulate import simulate

from .conftest import global_adapter, small_config


def _reply(name: str, delta: np.ndarray, n: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ins = Message(RecordDict(), dst_node_id=7, message_type="train")
    content = RecordDict({keys.ARRAYS: to_array_record({"w": delta}),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0}),
                          keys.SITE: ConfigRecord({keys.SITE_NAME: name})})
    return Message(content, reply_to=ins)


def test_fedavg_weights_deltas_by_record_count():
    updates = [Update("b", 30, {"w": np.full(3, 1.0, np.float32)}), Update("a", 10, {"w": np.full(3, 5.0, np.float32)})]
    w = weighted_mean(updates)["w"]
    np.testing.assert_allclose(w, np.full(3, (1.0 * 30 + 5.0 * 10) / 40), rtol=1e-6)
    assert w.dtype == np.float32


def test_aggregate_is_independent_of_delivery_order_and_equals_flowers_fedavg():
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(1)
    deltas = [rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-4, 4) for _ in range(5)]
    updates = [Update(f"site-{i}", 10 + i, {"w": d}) for i, d in enumerate(deltas)]
    a, b = weighted_mean(updates)["w"], weighted_mean(updates[::-1])["w"]
    assert np.array_equal(a, b)
    # bit for bit what Flower's FedAvg computes from the same replies in site order
    replies = [_reply(u.site, u.delta["w"], u.weight) for u in updates]
    flower, _ = FedAvg(arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG).aggregate_train(1, replies)
    assert np.array_equal(a, from_array_record(flower)["w"])


def test_inprocess_simulation_writes_the_run_directory(site_data, tmp_path):
    summary = simulate(small_config(site_data), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["global-r0000.safetensors.sealed",
                                                                     "global-r0001.safetensors.sealed"]
    lines = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    site_lines = [x for x in lines if x["round"] == 1 and x["site"] != "federation"]
    assert {x["site"] for x in site_lines} == {"site-0", "site-1"}
    for x in site_lines:
        for field in ("train_loss", "eval_loss", "records", "bytes_down", "bytes_up", "train_seconds"):
            assert field in x, field
        assert x["records"] == 96 and x["bytes_up"] > 0
    assert summary["rounds_completed"] == 1
    assert (run / "summary.md").read_text().startswith("# fedsecure run summary")
    state = global_adapter(run, 1)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
    from fedsecure.crypto import inspect

    assert inspect(run / "adapters" / "global-r0001.safetensors.sealed").metadata["round"] == "1"
    # the signed compliance report, built from what the sites reported
    from fedsecure.reports.report_files import verify_report

    report = __import__("json").loads((run / "report.json").read_text())
    verify_report(run / "report.json", run / "keys" / "coordinator-report.pub.pem")
    for row in report["sites"]:
        mine = [x for x in site_lines if x["site"] == row["site"]]
        assert row["epsilon_by_round"] == [[1, mine[0]["epsilon"]]]
        assert row["q"] == mine[0]["q"] and row["records"] == 96
        assert row["epsilon"]["within_tolerance"] is True


def test_same_seed_gives_the_same_global_adapter(site_data, tmp_path):
    cfg = small_config(site_data)
    simulate(cfg, run_dir=tmp_path / "a")
    simulate(cfg, run_dir=tmp_path / "b")
    a, b = global_adapter(tmp_path / "a", 1), global_adapter(tmp_path / "b", 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_site_with_broken_data_is_reported_and_the_round_goes_on(site_data, tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        (data / f"site-{i}").mkdir(parents=True)
        for split in ("train.jsonl", "eval.jsonl"):
            (data / f"site-{i}" / split).write_bytes((site_data / f"site-{i}" / split).read_bytes())
    (data / "site-2" / "train.jsonl").write_text('{"text": "fine"}\nnot json\n')
    summary = simulate(small_config(data, federation={"sites": 3, "rounds": 1}), run_dir=tmp_path / "run")
    r1 = summary["rounds"][1]
    assert r1["sites_ok"] == 2
    assert "site-2" in " ".join(r1["failures"]) or any("not valid JSON" in v for v in r1["failures"].values())
    assert any("train.jsonl:2: not valid JSON" in v for v in r1["failures"].values())
    assert summary["final_eval_loss"] is not None


@pytest.mark.slow
def test_demo_config_learns_clearly_under_dp(tmp_path):
    """The `make demo` run: 3 sites, 3 rounds of deepseek-v3-tiny with DP-SGD at epsilon = 3."""
    from pathlib import Path

    from fedsecure.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "simulation.yaml",
                      {"site.noise_seed": 11})
    summary = simulate(cfg, run_dir=tmp_path / "demo")
    assert summary["rounds_completed"] == 3
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5, summary
    losses = [r["eval_loss"] for r in summary["rounds"]]
    assert losses == sorted(losses, reverse=True)  # improves every round
    for site in summary["privacy"]["sites"].values():
        assert site["status"] == "active" and site["epsilon_spent"] <= 3.0
    # the report does not hide that this run's noise was seeded (reproducible by anyone with the seed)
    report = __import__("json").loads((tmp_path / "demo" / "report.json").read_text())
    assert any(f["severity"] == "error" and "noise seed" in f["text"] for f in report["findings"])
    assert "NOT PROTECTED" in report["trust_model"]["noise_generator"]


@pytest.mark.slow
def test_non_private_run_learns_more(tmp_path):
    """The utility DP costs: the same run without DP must reach a clearly lower loss."""
    cfg = small_config(None, federation={"sites": 2, "rounds": 2}, privacy={"enabled": False},
                       site={"privacy": {"dp_required": False}}, train={"local_steps": 8})
    summary = simulate(cfg, run_dir=tmp_path / "nodp")
    assert summary["privacy"]["record_level"] is False
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0


def test_a_site_that_never_answers_is_dropped_and_gets_a_full_adapter_when_back(site_data, tmp_path):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app as client_app
    from fedsecure.federation.coordinator import Coordinator
    from fedsecure.federation.inprocess import InProcessGrid
    from fedsecure.launch.engines import node_configs, run_config
    from fedsecure.launch.simulate import prepare
    from fedsecure.store.keyrings import coordinator_keyring
    from fedsecure.store.rundir import RunDir

    cfg, run = prepare(small_config(site_data, federation={"rounds": 2}), tmp_path / "run")
    rc = run_config(cfg, run.path)
    grid = InProcessGrid(client_app, node_configs(cfg, run.path), rc)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    silent = sorted(grid.get_node_ids())[1]
    coordinator = Coordinator(cfg, RunDir(run.path, coordinator_keyring(cfg.storage, run.path)))

    real_send = grid.send_and_receive
    calls = {"n": 0}

    def flaky(messages, *, timeout=None):
        calls["n"] += 1
        grid.offline = {silent} if calls["n"] == 2 else set()  # silent during round 1's training
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = flaky
    summary = coordinator.run(grid)
    r1, r2 = summary["rounds"][1], summary["rounds"][2]
    assert r1["sites_ok"] == 1 and "no reply before the round timeout" in r1["failures"].values()
    assert r2["sites_ok"] == 2 and r2["failures"] == {}  # back in round 2, with a keyframe it can use


@pytest.mark.slow
def test_malformed_replies_and_stolen_names_do_not_break_the_round(site_data, tmp_path, monkeypatch):
    """site-1 answers training without metrics (round 1) and claims site-0's name (round 2): the coordinator
    rejects the first, keeps the second under site-1's own name, and the run goes on."""
    import client.app as client_app
    from fedsecure.federation.site import handle_train

    def lying(msg, context):
        reply = handle_train(msg, context)
        if int(context.node_config.get("partition-id", -1)) != 1 or reply.has_error():
            return reply
        if int(msg.content[keys.CONFIG][keys.SERVER_ROUND]) == 1:
            del reply.content[keys.METRICS]
        else:
            reply.content[keys.SITE] = ConfigRecord({**dict(reply.content[keys.SITE]), keys.SITE_NAME: "site-0"})
        return reply

    monkeypatch.setattr(client_app, "handle_train", lying)
    summary = simulate(small_config(site_data, federation={"rounds": 2}, train={"local_steps": 2}),
                       run_dir=tmp_path / "run")
    r1, r2 = summary["rounds"][1], summary["rounds"][2]
    assert "malformed reply: the reply has missing 'metrics'" in r1["failures"]["site-1"] and r1["sites_ok"] == 1
    assert r2["sites_ok"] == 2 and set(r2["attestation"]) == {"site-0", "site-1"}
    events = [__import__("json").loads(x) for x in (tmp_path / "run" / "audit.log").read_text().splitlines()]
    conflict = [e for e in events if e["event"] == "site.name-conflict"]
    assert conflict and conflict[0]["claimed"] == "site-0" and conflict[0]["current"] == "site-1"
