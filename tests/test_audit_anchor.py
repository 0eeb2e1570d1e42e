"""The audit log's tail is anchored: a finished run closes its log with ``run.completed`` and records the head in
summary.json and the checkpoint; ``fedsecure audit verify`` compares a log with those heads (a cut, replaced or
extended log fails); a finished run directory is never resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedsecure.audit import (
    GENESIS,
    AuditLog,
    check_anchor,
    expected_head,
    read_chain,
    tail,
    verify_anchored,
    verify_log,
)
from fedsecure.config import SimulationConfig
from fedsecure.errors import ConfigError, FedSecureError, IntegrityError
from fedsecure.federation import checkpoint, coordinator
from fedsecure.launch import engines
from fedsecure.launch.simulate import simulate
from fedsecure.store.rundir import RunDir

from .conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")


@pytest.fixture(scope="module")
def finished(site_data, tmp_path_factory) -> Path:
    """A finished two-round run (sealed, attested); tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("anchor") / "run"
    simulate(small_config(site_data, federation={"rounds": 2}, train={"local_steps": 2}), run_dir=run)
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _verify(*args: str):
    from fedsecure.cli import app

    return CliRunner().invoke(app, ["audit", "verify", *args])


def _cut(log: Path, keep: int) -> None:
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:keep]))


# --------------------------------------------------------------------------- what a finished run records
def test_a_finished_run_closes_its_log_and_records_the_head_everywhere(run):
    entries = AuditLog(run / "audit.log").entries()
    last = entries[-1]
    assert last["event"] == "run.completed" and [e["event"] for e in entries].count("run.completed") == 1
    assert last["rounds_completed"] == 2 and last["stopped"] is None
    assert last["final_adapter"] == "global-r0002.safetensors.sealed"
    count, head = verify_log(run / "audit.log")
    att = json.loads((run / "summary.json").read_text())["attestation"]
    assert (att["audit_head"], att["audit_entries"], att["audit_last_event"]) == (head, count, "run.completed")
    state = json.loads((run / checkpoint.CHECKPOINT).read_text())
    assert state["version"] == 2 and state["audit"] == {"head": head, "entries": count}
    assert state["finished"] == {"audit_head": head, "audit_entries": count, "rounds_completed": 2, "stopped": None,
                                 "final_adapter": "global-r0002.safetensors.sealed"}


def test_the_checkpoint_of_every_round_anchors_the_log_so_far(site_data, tmp_path, monkeypatch):
    class Crash(RuntimeError):
        pass

    real, calls = coordinator.weighted_mean, []

    def crash_in_round_2(updates):
        calls.append(1)
        if len(calls) == 2:
            raise Crash("coordinator killed during round 2")
        return real(updates)

    monkeypatch.setattr(coordinator, "weighted_mean", crash_in_round_2)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        simulate(small_config(site_data, federation={"rounds": 2}, train={"local_steps": 2}), run_dir=run)
    state = json.loads((run / checkpoint.CHECKPOINT).read_text())
    assert state["round"] == 1 and state["finished"] is None
    chain = read_chain(run / "audit.log")
    n = state["audit"]["entries"]
    assert 0 < n < chain.count and chain.hash_at(n) == state["audit"]["head"]  # round 2's nonces came after it
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 0 and "matches coordinator-state.json (after round 1) up to entry" in res.output
    _cut(run / "audit.log", n - 1)
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and f"records {n} entries" in res.output and "truncated or replaced" in res.output


# --------------------------------------------------------------------------- audit verify
def test_verify_an_intact_log_says_what_it_matched(run):
    res = _verify(str(run / "audit.log"))
    count, head = verify_log(run / "audit.log")
    assert res.exit_code == 0, res.output
    assert f"OK: {count} entries, chain intact, head {head}" in res.output
    assert f"matches summary.json ({count} entries)" in res.output and "matches coordinator-state.json" in res.output
    res = _verify(str(run / "audit.log"), "--expect-head", head.upper())
    assert res.exit_code == 0 and "matches --expect-head" in res.output


def test_a_log_cut_after_10_entries_fails(run):
    count, head = verify_log(run / "audit.log")
    assert count > 10
    _cut(run / "audit.log", 10)
    assert verify_log(run / "audit.log")[0] == 10  # the chain alone cannot see the cut
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and res.output.startswith("error: ") and "Traceback" not in res.output
    assert "the log ends at entry 10" in res.output
    assert f"summary.json records {count} entries with head {head}" in res.output
    assert "the log was truncated or replaced" in res.output
    (run / "summary.json").unlink()  # the checkpoint alone still catches it
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and f"coordinator-state.json records {count} entries" in res.output
    res = _verify(str(run / "audit.log"), "--no-anchor")
    assert res.exit_code == 0 and "recorded heads not compared (--no-anchor)" in res.output
    assert "truncation of the tail cannot be ruled out" in res.output


def test_an_edited_log_fails(run):
    log = run / "audit.log"
    log.write_text(log.read_text().replace('"event":"round.aggregated"', '"event":"round.Aggregated"', 1))
    res = _verify(str(log))
    assert res.exit_code == 2 and "the entry's hash does not match its content" in res.output


def test_a_log_rewritten_to_a_shorter_chain_and_a_matching_summary_fails(run):
    # cut, then edit summary.json to the cut log's head and count: the log must end with run.completed
    log = run / "audit.log"
    _cut(log, 10)
    count, head = verify_log(log)
    for name, section in (("summary.json", "attestation"),):
        doc = json.loads((run / name).read_text())
        doc[section].update(audit_head=head, audit_entries=count)
        (run / name).write_text(json.dumps(doc))
    (run / checkpoint.CHECKPOINT).unlink()
    res = _verify(str(log))
    assert res.exit_code == 2 and "says the run finished, so the log must end with 'run.completed'" in res.output


def test_entries_appended_after_the_run_finished_fail(run):
    count, _ = verify_log(run / "audit.log")
    AuditLog(run / "audit.log").append("forged.event")
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and f"goes on 1 entries past the end summary.json records (entry {count})" in res.output


def test_a_log_from_another_chain_fails(run, tmp_path):
    other = AuditLog(tmp_path / "other.log")
    for i in range(verify_log(run / "audit.log")[0] + 1):
        other.append("x", i=i)
    shutil.copy(tmp_path / "other.log", run / "audit.log")
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and "the log was replaced" in res.output


def test_expect_head_that_does_not_match_fails(run, tmp_path):
    shutil.copy(run / "audit.log", tmp_path / "copy.log")  # no run directory around it
    res = _verify(str(tmp_path / "copy.log"))
    assert res.exit_code == 0 and "no recorded head to compare with: truncation of the tail cannot be ruled out" \
        in res.output
    res = _verify(str(tmp_path / "copy.log"), "--expect-head", "ab" * 32)
    assert res.exit_code == 2 and "no entry has the head --expect-head gives" in res.output
    earlier = read_chain(tmp_path / "copy.log").hash_at(3)
    res = _verify(str(tmp_path / "copy.log"), "--expect-head", str(earlier))
    assert res.exit_code == 2 and "is entry 3, but the log goes on" in res.output
    res = _verify(str(tmp_path / "copy.log"), "--expect-head", "abc")
    assert res.exit_code == 2 and "64 hex digits" in res.output


def test_a_missing_or_unreadable_log_is_a_one_line_error(tmp_path):
    for target, says in ((tmp_path / "runs" / "x" / "audit.log", "does not exist"), (tmp_path, "cannot read it")):
        res = _verify(str(target))
        assert res.exit_code == 2 and res.output.startswith("error: ") and says in res.output
        assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


def test_a_damaged_summary_beside_the_log_is_named(run):
    (run / "summary.json").write_text("{cut")
    res = _verify(str(run / "audit.log"))
    assert res.exit_code == 2 and "summary.json cannot be read as JSON" in res.output


def test_library_pieces():
    with pytest.raises(ConfigError, match="64 hex digits"):
        expected_head("zz" * 32)
    assert expected_head(" " + "AB" * 32 + "\n").head == "ab" * 32


def test_tail_reads_the_head_without_the_chain(tmp_path):
    log = tmp_path / "audit.log"
    assert tail(log) == (0, GENESIS)
    a = AuditLog(log)
    a.append("x")
    a.append("y")
    assert tail(log) == (2, a.head)
    log.write_bytes(log.read_bytes()[:-5])
    assert tail(log) is None
    with pytest.raises(FedSecureError, match="does not exist"):
        verify_anchored(tmp_path / "nothing.log")


def test_a_head_only_anchor_that_matches(tmp_path):
    a = AuditLog(tmp_path / "audit.log")
    a.append("x")
    assert check_anchor(read_chain(tmp_path / "audit.log"), expected_head(a.head)) == "matches --expect-head"
    with pytest.raises(IntegrityError):
        check_anchor(read_chain(tmp_path / "audit.log"), expected_head("0" * 63 + "1"))


# --------------------------------------------------------------------------- a finished run is not resumed
def test_a_finished_run_is_not_resumed_and_nothing_is_written(run):
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    prepared = SimulationConfig.from_mapping(yaml.safe_load((run / "config.yaml").read_text()))
    head = json.loads((run / "summary.json").read_text())["attestation"]["audit_head"]
    with pytest.raises(FedSecureError) as e:
        engines.run_inprocess_engine(prepared, run)
    msg = str(e.value)
    assert msg.startswith(f"run directory {run} already holds a finished run (2 rounds, ended: all rounds done, "
                          f"audit head {head})")
    assert "Fix: start a new run with another run directory (server.run_dir / --run-dir)" in msg
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for name in ("audit.log", "summary.json", "summary.md", checkpoint.CHECKPOINT, "metrics.jsonl"):
        assert after[Path(name)] == before[Path(name)], name  # byte-identical
    assert {k for k in after if after[k] != before.get(k)} <= {Path("coordinator-error.json")}  # the failure note
    # a changed configuration is refused as before, and also before the attestation gate writes its first entry
    doc = prepared.to_dict()
    changed = SimulationConfig.from_mapping({**doc, "train": {**doc["train"], "local_steps": 3}})
    with pytest.raises(ConfigError, match="holds a run with a different configuration"):
        engines.run_inprocess_engine(changed, run)
    assert (run / "audit.log").read_bytes() == before[Path("audit.log")]


def test_a_run_finished_before_checkpoints_recorded_it_is_not_resumed_either(run, site_data):
    state = json.loads((run / checkpoint.CHECKPOINT).read_text())
    old = {k: v for k, v in state.items() if k not in ("version", "audit", "finished")}  # a version-1 checkpoint
    (run / checkpoint.CHECKPOINT).write_text(json.dumps(old))
    cfg = SimulationConfig.from_mapping(yaml.safe_load((run / "config.yaml").read_text()))
    read = checkpoint.Checkpoint.read(RunDir(run), cfg)  # still read
    assert read is not None and read.round == 2 and read.finished is None and read.audit_head is None
    log = (run / "audit.log").read_bytes()
    with pytest.raises(FedSecureError, match="already holds a finished run .2 rounds"):
        coordinator.Coordinator(cfg, RunDir(run))
    assert (run / "audit.log").read_bytes() == log
    (run / "summary.json").unlink()  # an unfinished run (v1 checkpoint) is resumable: nothing refuses it
    assert checkpoint.finished_run(RunDir(run)) is None
