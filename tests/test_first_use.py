"""First use of a deployment and of simulate (issue 20): configs generated per site, paths relative to their
file whatever the working directory, the coordinator's own error surfaced, exit codes that say a run ended
early, a finished run not resumed, and a warning before a budget remnant is spent on noise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.data.synth import synthesize
from fedsecure.errors import ConfigError
from fedsecure.federation import site_events
from fedsecure.launch.deploy import FinishedRunError, Server
from fedsecure.launch.deploy_config import load_coordinator_config, load_site_config
from fedsecure.launch.engines import failure_message
from fedsecure.store.rundir import read_failure, write_failure

runner = CliRunner()
SMALL = ["--sites", "2", "--rounds", "1", "--set", "data.records_per_site=40", "--set", "train.local_steps=2",
         "--set", "train.batch_size=8", "--set", "data.max_length=32", "--set", "attestation.enabled=false"]


@pytest.fixture
def consortium(tmp_path):
    """`certs init` + dev policy + trial data, as the README does, under tmp_path/deploy."""
    out = tmp_path / "deploy"
    res = runner.invoke(app, ["certs", "init", "--out", str(out), "--host", "coordinator.example.org",
                              "--site", "hospital-a", "--site", "hospital-b"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["attest", "dev-policy", "--out", str(out / "attestation-policy.yaml")]).exit_code == 0
    synthesize(out / "data", sites=2, records_per_site=40, eval_fraction=0.2, seed=1)
    return out


def test_certs_init_covers_loopback_and_writes_a_config_per_site_and_for_the_coordinator(consortium, tmp_path,
                                                                                        monkeypatch):
    cert = x509.load_pem_x509_certificate((consortium / "coordinator.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {
        str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert {"coordinator.example.org", "localhost", "127.0.0.1"} <= names
    monkeypatch.chdir(tmp_path)  # not the configs' folder
    sites = [load_site_config(consortium / "sites" / s / "site.yaml") for s in ("hospital-a", "hospital-b")]
    assert [s.name for s in sites] == ["hospital-a", "hospital-b"]
    assert sites[0].runtime_port != sites[1].runtime_port
    assert sites[1].data_dir == (consortium / "data" / "site-1").resolve()
    assert sites[0].state_dir == (consortium / "sites" / "hospital-a" / "state").resolve()
    assert sites[0].tls_ca.read_bytes() == (consortium / "ca.pem").read_bytes()
    assert oct(sites[0].auth_key.stat().st_mode & 0o777) == "0o600"
    import dataclasses

    from fedsecure.config import SitePolicy

    # the generated policy is the shipped one (configs/site.yaml, tested against the defaults)
    assert sites[0].settings.privacy == dataclasses.replace(SitePolicy(), delta=1e-5)
    dc = load_coordinator_config(consortium / "coordinator.yaml")
    assert set(dc.sites) == {"hospital-a", "hospital-b"}
    assert dc.run_dir == (consortium / "runs" / "consortium").resolve()


def test_add_site_gets_the_next_port_and_data_folder_and_keeps_an_edited_config(consortium):
    res = runner.invoke(app, ["certs", "add-site", "hospital-c", "--out", str(consortium)])
    assert res.exit_code == 0, res.output
    assert "hospital-c: sites/hospital-c/auth.pub" in res.output  # what to add to server.sites
    doc = yaml.safe_load((consortium / "sites" / "hospital-c" / "site.yaml").read_text())["site"]
    assert doc["runtime_port"] == 9096 and doc["data_dir"] == "../../data/site-2"
    edited = consortium / "sites" / "hospital-a" / "site.yaml"
    edited.write_text(edited.read_text().replace("epsilon_budget: 3.0", "epsilon_budget: 1.0"))
    res = runner.invoke(app, ["certs", "init", "--out", str(consortium), "--site", "hospital-a", "--force"])
    assert res.exit_code == 0
    assert "epsilon_budget: 3.0" in edited.read_text()  # --force replaces keys and configs, as it says
    res = runner.invoke(app, ["certs", "add-site", "bad", "--out", str(consortium), "--superlink", "nohostport"])
    assert res.exit_code == 2 and "not host:port" in res.output


def test_coordinator_paths_are_relative_to_the_config_not_the_working_directory(consortium, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dc = load_coordinator_config(consortium / "coordinator.yaml")
    assert dc.federation.attestation.policy == str((consortium / "attestation-policy.yaml").resolve())
    # a --set path is the caller's: relative to the working directory
    (elsewhere / "p.yaml").write_text((consortium / "attestation-policy.yaml").read_text())
    dc = load_coordinator_config(consortium / "coordinator.yaml", {"attestation.policy": "p.yaml"})
    assert dc.federation.attestation.policy == str(elsewhere / "p.yaml")
    # a missing policy stops `fedsecure server` at once, with the path it looked at and how to make one
    (consortium / "attestation-policy.yaml").unlink()
    with pytest.raises(ConfigError, match=r"attestation.policy: .*deploy/attestation-policy.yaml does not exist.*"
                                          r"fedsecure attest dev-policy"):
        load_coordinator_config(consortium / "coordinator.yaml")


def test_a_site_config_given_to_the_server_is_named_as_such(consortium):
    res = runner.invoke(app, ["server", "-c", str(consortium / "sites" / "hospital-a" / "site.yaml")])
    assert res.exit_code == 2
    assert "is a site's config (for `fedsecure client`)" in res.output and "configs/coordinator.yaml" in res.output
    res = runner.invoke(app, ["client", "-c", str(consortium / "coordinator.yaml")])
    assert res.exit_code == 2 and "is the coordinator's config (for `fedsecure server`)" in res.output


def test_the_coordinators_own_error_reaches_the_server_output(tmp_path):
    assert read_failure(tmp_path) is None
    assert "see " in failure_message("7", "finished:failed", tmp_path, tmp_path / "superlink.log", 0.0)
    write_failure(tmp_path, ConfigError("attestation policy /x/p.yaml: cannot read it (No such file)"))
    msg = failure_message("7", "finished:failed", tmp_path, tmp_path / "superlink.log", 0.0)
    assert msg.startswith("the coordinator stopped: attestation policy /x/p.yaml: cannot read it")
    assert "finished:failed" in msg and "superlink.log" in msg
    stamp = (tmp_path / "coordinator-error.json").stat().st_mtime
    assert read_failure(tmp_path, since=stamp + 10) is None  # an older run's error is not this run's


def test_the_server_app_records_why_it_stopped(tmp_path):
    from flwr.app import Context, RecordDict

    from server.app import main

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"run-dir": str(tmp_path), "model.lora.r": -3})
    with pytest.raises(ConfigError):
        main(None, ctx)  # type: ignore[arg-type]
    assert "model.lora.r" in (read_failure(tmp_path) or "")


def test_a_finished_run_directory_is_refused_before_anything_starts(consortium, tmp_path):
    dc = load_coordinator_config(consortium / "coordinator.yaml")
    dc.run_dir.mkdir(parents=True)
    (dc.run_dir / "summary.json").write_text(json.dumps({"rounds_completed": 3, "stopped": None,
                                                         "attestation": {"audit_head": "ab" * 32}}))
    srv = Server(dc, emit=lambda line: None)
    with pytest.raises(FinishedRunError, match=r"holds a finished run \(3 rounds, ended: all rounds done, audit head "
                                               r"abab.*--run-dir.*its report is .*summary.md"):
        srv.run()
    assert not (dc.run_dir / "flwr-home").exists()  # nothing was started or written


def test_a_run_that_ends_early_exits_1_with_the_reason(tmp_path):
    # every site's own budget is far too small for the run: each refuses round 1, the run ends there
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r"), *SMALL,
                              "--set", "site.privacy.epsilon_budget=0.001"])
    assert res.exit_code == 1, res.output
    assert "the run ended early after round 0: privacy budget exhausted" in res.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stopped"]


def test_a_completed_run_exits_0(tmp_path):
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r"), *SMALL])
    assert res.exit_code == 0, res.output
    assert "ended early" not in res.output
    # every message a site handled is in its events, from the first (round 0's evaluation, before any state)
    events = [json.loads(line)["event"] for line in
              (tmp_path / "r" / "sites" / "site-0" / site_events.EVENTS).read_text().splitlines()]
    assert events == [site_events.EVALUATED, site_events.TRAINED, site_events.EVALUATED]
    # the same run directory again: a finished run, refused before any file in it is rewritten
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()}
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r"), *SMALL])
    assert res.exit_code == 2 and "already holds a finished run" in res.output, res.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()} == before


def test_simulate_warns_before_spending_a_budget_remnant(tmp_path):
    state = str(tmp_path / "state")
    data = tmp_path / "data"
    synthesize(data, sites=2, records_per_site=40, eval_fraction=0.2, seed=1)
    common = [*SMALL, "--data-dir", str(data), "--set", f"site.state_dir={state}"]
    # run 1 asks for ε 2.99 of each site's 3: about 0.01 is left afterwards
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r1"), *common,
                              "--set", "privacy.epsilon_budget=2.99"])
    assert res.exit_code == 0, res.output
    assert "remnant" not in res.output
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r2"), *common])
    assert res.exit_code == 0, res.output
    first_round = res.output.index("round 0:")
    warning = res.output.index("warning: site-0: spending a budget remnant")
    assert warning < first_round, res.output  # said before any work
    assert "sigma" in res.output[warning:first_round] and "x the noise" in res.output[warning:first_round]
    # the site recorded the same warning for its operator, and its progress lines
    events = [json.loads(line) for line in (Path(state) / "site-0" / site_events.EVENTS).read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count(site_events.REMNANT) == 1 and kinds.count(site_events.TRAINED) == 2
    lines = [site_events.describe("site-0", e) for e in events]
    assert any("WARNING: spending a budget remnant" in (line or "") for line in lines)
    assert any("the run is finished on this site's side" in (line or "") for line in lines)


def test_simulate_warns_when_a_site_will_refuse_every_round(tmp_path):
    state = str(tmp_path / "state")
    data = tmp_path / "data"
    synthesize(data, sites=2, records_per_site=40, eval_fraction=0.2, seed=1)
    common = [*SMALL, "--data-dir", str(data), "--set", f"site.state_dir={state}"]
    assert runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r1"), *common]).exit_code == 0
    # the site lowered its budget below what the dataset has already spent
    res = runner.invoke(app, ["simulate", "--run-dir", str(tmp_path / "r2"), *common,
                              "--set", "site.privacy.epsilon_budget=2"])
    assert "site-0 will refuse every round: its privacy budget for this dataset is spent" in res.output
    assert res.exit_code == 1  # and the run says it ended early


def test_site_events_describe_every_kind():
    base = {"run": "r/1", "round": 2, "rounds": 3}
    for kind, needle in [(site_events.TRAINED, "epsilon spent 1.5 of 3"), (site_events.REFUSED, "refused: why"),
                         (site_events.EXHAUSTED, "budget exhausted"), (site_events.NON_PRIVATE, "WITHOUT"),
                         (site_events.FAILED, "failed: why"), (site_events.REMNANT, "WARNING: why"),
                         (site_events.EVALUATED, "held-out loss 6.0000")]:
        ev = {**base, "event": kind, "reason": "why", "epsilon": 1.5, "budget": 3, "loss": 6.0, "sigma": 1.0,
              "records": 10, "steps": 2}
        assert needle in (site_events.describe("h", ev) or ""), kind
    assert site_events.describe("h", {**base, "event": "unknown"}) is None


def _ignored(root, rel):
    res = subprocess.run(["git", "check-ignore", "--no-index", "-q", rel], cwd=root, capture_output=True)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gitignore_keeps_key_material_and_site_state_out_but_ships_the_deploy_files():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for rel in ["deploy/ca.key", "deploy/ca.pem", "deploy/coordinator.yaml", "deploy/attestation-policy.yaml",
                "deploy/sites/hospital-a/auth.key", "deploy/sites/hospital-a/site.yaml", "deploy/data/site-0/x.jsonl",
                "deploy/runs/r1/metrics.jsonl", "state/site-0/ledger.json", "anywhere/site.key", "runs/x"]:
        assert _ignored(root, rel), f"{rel} would be committed"
    shipped = [p.relative_to(root).as_posix() for d in ("ansible", "prometheus", "grafana", "container")
               for p in (root / "deploy" / d).rglob("*") if p.is_file()]
    assert len(shipped) >= 8
    for rel in shipped:
        assert not _ignored(root, rel), f"{rel} is shipped but .gitignore keeps it out of a clone"


def test_a_second_stop_signal_does_not_interrupt_the_clean_up_of_the_first():
    import signal
    import threading

    from fedsecure.launch.deploy import install_signal_handlers

    old = signal.getsignal(signal.SIGTERM)
    event = threading.Event()
    try:
        install_signal_handlers(event)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert event.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. `timeout` forwarding the same stop: ignored, clean-up goes on
    finally:
        signal.signal(signal.SIGTERM, old)
