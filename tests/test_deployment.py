"""Real deployment on 127.0.0.1: `fedsecure server` and `fedsecure client` as separate processes (Flower's
SuperLink and SuperNodes, TLS, SuperNode authentication), and their failures: a site killed mid-round, a
coordinator stopped and restarted, an unregistered site, a SuperNode without TLS, another CA."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsecure.config import SimulationConfig
from fedsecure.data.synth import synthesize
from fedsecure.launch.certs import init as certs_init
from fedsecure.launch.engines import _descendants, _stop
from fedsecure.launch.simulate import simulate

from .conftest import global_adapter
from .net import attempts, guarded_env, outbound
from .scrape import scrape as _scrape

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify."
                                                           "SoftwareAttestationWarning")]
FEDSECURE = str(Path(sys.executable).with_name("fedsecure"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """Files for one consortium in ``root`` and the processes started from them (all stopped at the end)."""

    def __init__(self, root: Path, rounds: int = 2, round_timeout_s: float = 120.0, private: bool = True) -> None:
        """``private=False``: both sites' own policies allow non-private training and the run asks for it, so the
        run is deterministic and can be compared with the simulation bit for bit (a deployed site's DP noise
        comes from the OS's secure generator, which nobody can replay)."""
        self.root = root
        self.port = _port()
        certs_init(root / "certs", ["localhost", "127.0.0.1"], ["site-0", "site-1", "rogue"])
        synthesize(root / "data", sites=2, records_per_site=40, eval_fraction=0.2, seed=7)
        if private:
            subprocess.run([FEDSECURE, "attest", "dev-policy", "--out", str(root / "policy.yaml")], check=True,
                           capture_output=True)
        else:  # the development policy without minimum DP settings: the sites attest DP off, as they run
            from fedsecure.attestation.evidence import code_hash
            from fedsecure.attestation.policy import Policy

            (root / "policy.yaml").write_text(Policy(measurements={"software": (code_hash(),)},
                                                     code=(code_hash(),)).to_yaml())
        self.federation = {"seed": 3, "federation": {"rounds": rounds, "round_timeout_s": round_timeout_s,
                                                     "join_timeout_s": 120},
                           "data": {"max_length": 48}, "train": {"local_steps": 2, "batch_size": 8},
                           "privacy": {"enabled": private}, "attestation": {"policy": "policy.yaml"}}
        self.site_privacy = {"epsilon_budget": 3.0, "delta": 1e-5, "dp_required": private}
        server = {"run_dir": "run", "host": "127.0.0.1", "port": self.port, "tls_ca": "certs/ca.pem",
                  "tls_cert": "certs/coordinator.pem", "tls_key": "certs/coordinator.key",
                  "sites": {s: f"certs/sites/{s}/auth.pub" for s in ("site-0", "site-1")}}
        (root / "coordinator.yaml").write_text(yaml.safe_dump({"server": server, **self.federation}))
        self.site_metrics_port = _port()
        for i, name in enumerate(["site-0", "site-1", "rogue"]):
            site = {"name": name, "superlink": f"127.0.0.1:{self.port}", "tls_ca": "certs/ca.pem",
                    "auth_key": f"certs/sites/{name}/auth.key", "data_dir": f"data/site-{min(i, 1)}",
                    "state_dir": f"state/{name}", "runtime_port": _port(), "privacy": self.site_privacy}
            if name == "site-0":  # its own endpoint, served by its supervisor
                site["metrics"] = {"enabled": True, "port": self.site_metrics_port}
            (root / f"{name}.yaml").write_text(yaml.safe_dump({"site": site}))
        self.procs: dict[str, subprocess.Popen] = {}
        self.net_log: Path | None = None  # set: every process started records its lookups and connects (tests/net.py)

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        out = (self.root / f"{name}.out").open("ab")
        env = guarded_env(self.net_log) if self.net_log else dict(os.environ)
        proc = subprocess.Popen([FEDSECURE, *argv], cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**env, "COLUMNS": "200"})
        out.close()
        self.procs[name] = proc
        return proc

    def server(self) -> subprocess.Popen:
        return self.start("server", "server", "--config", "coordinator.yaml")

    def site(self, name: str) -> subprocess.Popen:
        return self.start(name, "client", "--config", f"{name}.yaml")

    def output(self, name: str) -> str:
        p = self.root / f"{name}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_for(self, what, timeout_s: float = 300.0, every: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            for name, proc in self.procs.items():
                if name == "server" and proc.poll() not in (None, 0):
                    raise AssertionError(f"server exited {proc.returncode}:\n{self.output('server')[-3000:]}")
            time.sleep(every)
        raise AssertionError(f"timed out; server output:\n{self.output('server')[-3000:]}")

    def rounds_done(self) -> list[dict]:
        p = self.root / "run" / "metrics.jsonl"
        if not p.exists():
            return []
        return [r for r in map(json.loads, p.read_text().splitlines()) if r["site"] == "federation"]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _stop(proc)


def _running_with(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a port, a folder)."""
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmd.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in line and state != "Z" and "pytest" not in line:
            found.append(line[:200])
    return found


def _kill_site(proc: subprocess.Popen) -> None:
    """SIGKILL a `fedsecure client` and everything below it (SuperNode, SuperExec, ClientApp), like a crash."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _registered(d: Deployment) -> bool:
    return "submitted Flower run" in d.output("server")


def test_two_sites_two_rounds_with_tls_and_node_auth_match_the_simulation(tmp_path):
    d = Deployment(tmp_path, private=False)
    d.net_log = tmp_path / "net.jsonl"
    try:
        _two_sites_match_the_simulation(d)
    finally:
        d.stop_all()
        time.sleep(1)
    assert not _running_with(f"127.0.0.1:{d.port}") and not _running_with(str(tmp_path)), "processes left running"
    # server, SuperLink, SuperExec, ServerApp, clients, SuperNodes, ClientApps, workers: nothing but loopback (the
    # configured coordinator address here) was looked up or contacted; no Flower telemetry
    assert attempts(d.net_log)  # the guard ran in those processes
    assert outbound(d.net_log) == [], outbound(d.net_log)[:5]


def _two_sites_match_the_simulation(d: Deployment) -> None:
    server = d.server()
    d.wait_for(lambda: _registered(d), 120)
    for name in ("site-0", "site-1", "rogue"):
        d.site(name)
    # a SuperNode without TLS (and without a key) gets no work
    insecure = subprocess.Popen([str(Path(sys.executable).with_name("flower-supernode")), "--insecure", "--superlink",
                                 f"127.0.0.1:{d.port}", "--port", str(_port())], cwd=d.root, start_new_session=True,
                                stdout=(d.root / "insecure.out").open("wb"), stderr=subprocess.STDOUT)
    d.procs["insecure"] = insecure
    assert server.wait(timeout=600) == 0, d.output("server")[-3000:]

    summary = json.loads((d.root / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert sorted(summary["privacy"]["sites"]) == ["site-0", "site-1"]  # rogue and insecure never trained
    assert all(h["sites_ok"] == 2 for h in summary["rounds"][1:])
    out = d.output("server")
    assert "refused: a SuperNode with an unregistered key tried to join" in out
    assert "Attestation: 4/4 statements verified (software)" in out
    assert "round 2: held-out loss" in out  # progress streamed
    # non-private by both sites' own choice, and reported as such; their ledgers say so too
    assert {s["status"] for s in summary["privacy"]["sites"].values()} == {"non-private"}
    assert "refused: the coordinator does not know this site's key" in d.output("rogue")
    assert "TLS, SuperNode authentication on" in out and (d.root / "run" / "superlink.db").exists()
    # the server wrote and signed its compliance report, which says plainly that nothing was private
    report = json.loads((d.root / "run" / "report.json").read_text())
    assert report["guarantees"]["record_level"]["enabled"] is False
    assert all(s["epsilon"]["unbounded"] for s in report["sites"])
    assert report["findings"][0] == {"severity": "error", "text": "Record-level DP was OFF: the updates of this run "
                                     "are not private."}
    assert (d.root / "run" / "report.dsse.json").is_file()
    # site-0's own endpoint (its supervisor outlives the run): two rounds trained WITHOUT DP, by its own choice
    assert f"site site-0: metrics on http://127.0.0.1:{d.site_metrics_port}/metrics" in d.output("site-0")
    site0 = d.wait_for(lambda: (m := _scrape(d.site_metrics_port)).get(
        ("fedsecure_site_messages_total", (("outcome", "non-private"), ("site", "site-0")))) == 2 and m, 30)
    assert site0[("fedsecure_site_last_round_non_private", (("site", "site-0"),))] == 1
    assert site0[("fedsecure_site_last_trained_round", (("site", "site-0"),))] == 2
    assert {dict(labels).get("site") for (_, labels) in site0} <= {"site-0", None}

    # the same seeds in the in-process simulation give the same global adapter
    fed = {**d.federation, "federation": {**d.federation["federation"], "sites": 2},
           "data": {**d.federation["data"], "dir": str(d.root / "data")}, "attestation": {"policy": None},
           "site": {"privacy": {"dp_required": False}}}
    simulate(SimulationConfig.from_mapping(fed), run_dir=d.root / "sim")
    deployed, simulated = global_adapter(d.root / "run", 2), global_adapter(d.root / "sim", 2)
    assert sorted(deployed) == sorted(simulated)
    for name in deployed:
        np.testing.assert_allclose(deployed[name], simulated[name], rtol=1e-5, atol=1e-7)


def test_two_sites_with_secure_aggregation_and_distributed_client_dp_on_the_real_superlink(tmp_path):
    d = Deployment(tmp_path, rounds=2)
    # each site prints its node key; the consortium writes the roster every party reads its own copy of
    lines = [subprocess.run([FEDSECURE, "attest", "node-key", "--config", f"{n}.yaml"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.strip() for n in ("site-0", "site-1")]
    subprocess.run([FEDSECURE, "attest", "roster", "--out", "roster.yaml", *lines], cwd=tmp_path, check=True,
                   capture_output=True)
    coord = yaml.safe_load((tmp_path / "coordinator.yaml").read_text())
    coord["federation"]["secure_aggregation"] = {"enabled": True, "dropouts": 0, "roster": "roster.yaml"}
    # client-level DP too: each site adds its share of the noise (a small σ_c, so the loss still falls in 2 rounds)
    coord.setdefault("privacy", {})["client_dp"] = {"enabled": True, "clip": 4.0, "noise_multiplier": 0.005}
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(coord))
    for name in ("site-0", "site-1"):
        doc = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        doc["site"]["secagg_roster"] = "roster.yaml"
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    try:
        server = d.server()
        d.wait_for(lambda: _registered(d), 120)
        d.site("site-0")
        d.site("site-1")
        assert server.wait(timeout=600) == 0, d.output("server")[-3000:]
    finally:
        d.stop_all()
    summary = json.loads((d.root / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary.get("stopped") is None
    assert all(h["sites_ok"] == 2 for h in summary["rounds"][1:])
    audit = [json.loads(x) for x in (d.root / "run" / "audit.log").read_text().splitlines()]
    agg = [e for e in audit if e["event"] == "round.aggregated"]
    assert [e["sites"] for e in agg] == [["site-0", "site-1"]] * 2 and all(e["secure_aggregation"] for e in agg)
    assert summary["rounds"][-1]["eval_loss"] < summary["rounds"][0]["eval_loss"]
    assert "Attestation: 4/4 statements verified (software)" in d.output("server")
    cl = summary["privacy"]["client_level"]
    assert [r["sites_in_sum"] for r in cl["per_round"]] == [2, 2] and cl["epsilon"] > 0
    assert "noise added at the sites" in (d.root / "run" / "privacy.md").read_text()


def test_site_killed_during_round_1_is_dropped_and_rejoins(tmp_path):
    d = Deployment(tmp_path, rounds=3, round_timeout_s=40.0)
    try:
        server = d.server()
        d.wait_for(lambda: _registered(d), 120)
        d.site("site-0")
        victim = d.site("site-1")
        d.wait_for(lambda: len(d.rounds_done()) >= 1, 300)  # round 0 evaluated: round 1 training starts
        time.sleep(3)
        _kill_site(victim)  # the site, its SuperNode and any ClientApp, mid-round
        d.wait_for(lambda: len(d.rounds_done()) >= 2, 300)
        d.site("site-1")  # it comes back
        assert server.wait(timeout=600) == 0, d.output("server")[-3000:]
        assert "ε spent site-0" in d.output("server")  # progress streamed, with ε per site
        rounds = json.loads((d.root / "run" / "summary.json").read_text())["rounds"]
        assert rounds[1]["sites_ok"] == 1 and "site-1" in rounds[1]["failures"]
        assert rounds[-1]["eval_loss"] is not None and len(rounds) == 4
        trained = json.loads((d.root / "run" / "summary.json").read_text())["privacy"]["sites"]["site-1"]
        assert any(r >= 2 for r in trained["rounds_trained"]), trained  # rejoined
        # its ledger is intact: it opens (seal, hash chain and recomputed epsilons all check out), and it holds
        # the spend of the round it was killed in if training had finished (spend is recorded before release)
        from fedsecure.crypto import read_keyring_file
        from fedsecure.data.dataset import fingerprint
        from fedsecure.privacy.ledger import PrivacyLedger

        ring = read_keyring_file(d.root / "state" / "keys" / "site-1.keyring.json")
        dataset = fingerprint([d.root / "data" / "site-1" / "train.jsonl"])
        ledger = PrivacyLedger.open(d.root / "state" / "site-1", dataset, ring=ring)
        assert len(ledger.entries) >= 1 and ledger.entries[-1].server_round >= 2
    finally:
        d.stop_all()


def test_coordinator_stopped_after_round_1_resumes_at_round_2(tmp_path):
    # generous round timeout: a SuperNode may still be finishing a message of the stopped run (Flower
    # ignores its reply) and reconnecting with back-off when the resumed run starts
    d = Deployment(tmp_path, rounds=3, round_timeout_s=300.0)
    try:
        first = d.server()
        d.wait_for(lambda: _registered(d), 120)
        d.site("site-0")
        d.site("site-1")
        d.wait_for(lambda: (d.root / "run" / "coordinator-state.json").exists()
                   and json.loads((d.root / "run" / "coordinator-state.json").read_text())["round"] == 1, 400)
        r1 = global_adapter(d.root / "run", 1)
        time.sleep(3)  # round 2's messages are out: the sites are busy with a run that is about to stop
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 130, d.output("server")[-2000:]
        assert "resumes after the last completed round" in d.output("server")
        second = d.server()
        assert second.wait(timeout=1200) == 0, d.output("server")[-3000:]
        summary = json.loads((d.root / "run" / "summary.json").read_text())
        assert [h["round"] for h in summary["rounds"]] == [0, 1, 2, 3]
        events = [json.loads(x) for x in (d.root / "run" / "audit.log").read_text().splitlines()]
        assert [e["after_round"] for e in events if e["event"] == "run.resumed"] == [1]
        for name, a in global_adapter(d.root / "run", 1).items():
            np.testing.assert_array_equal(a, r1[name])
    finally:
        d.stop_all()


def test_site_with_a_certificate_from_another_ca_is_refused(tmp_path):
    d = Deployment(tmp_path)
    try:
        d.server()
        d.wait_for(lambda: _registered(d), 120)
        certs_init(tmp_path / "other", ["localhost"], [])
        cfg = yaml.safe_load((tmp_path / "site-0.yaml").read_text())
        cfg["site"]["tls_ca"] = "other/ca.pem"
        (tmp_path / "site-0.yaml").write_text(yaml.safe_dump(cfg))
        site = d.site("site-0")
        assert site.wait(timeout=120) == 3
        assert "refused: the coordinator's TLS certificate is not signed by" in d.output("site-0")
    finally:
        d.stop_all()
