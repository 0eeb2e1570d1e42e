"""The coordinator's Prometheus endpoint: scraped during a real run, checked against metrics.jsonl and privacy.json;
scraped by Debian's Prometheus server; the alert rules checked and unit-tested with promtool."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fedsecure.config import MetricsSettings
from fedsecure.errors import ConfigError
from fedsecure.federation import bookkeeping
from fedsecure.launch.simulate import simulate

from .conftest import small_config
from .scrape import scrape as _scrape

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_figures_equal_the_run_records_round_by_round(site_data, tmp_path, monkeypatch):
    port = _port()
    scrapes: list[tuple[dict, dict]] = []
    original = bookkeeping.Bookkeeping.record

    def record_then_scrape(self, rl, loss, seconds, stopped=None):
        original(self, rl, loss, seconds, stopped)
        scrapes.append((dict(self.history[-1]), _scrape(port)))  # while the run goes on

    monkeypatch.setattr(bookkeeping.Bookkeeping, "record", record_then_scrape)
    cfg = small_config(site_data, federation={"rounds": 2}, metrics={"enabled": True, "port": port})
    summary = simulate(cfg, run_dir=tmp_path / "run")
    assert [row["round"] for row, _ in scrapes] == [0, 1, 2]
    down = up = 0
    for row, m in scrapes:
        down, up = down + row["bytes_down"], up + row["bytes_up"]
        assert m[("fedsecure_round", ())] == row["round"]
        assert m[("fedsecure_rounds_completed_total", ())] == row["round"] + 1
        assert m[("fedsecure_eval_loss", ())] == pytest.approx(row["eval_loss"])
        assert m[("fedsecure_bytes_total", (("direction", "down"),))] == down
        assert m[("fedsecure_bytes_total", (("direction", "up"),))] == up
        assert m[("fedsecure_sites", (("state", "active"),))] == row["sites_ok"]
        assert m[("fedsecure_round_last_duration_seconds", ())] == pytest.approx(row["seconds"])
        assert m[("fedsecure_round_duration_seconds_count", ())] == row["round"] + 1
        accepted = sum(r.startswith("verified") for h in summary["rounds"][: row["round"] + 1]
                       for r in h.get("attestation", {}).values())
        assert m.get(("fedsecure_attestation_total", (("result", "accepted"),)), 0) == accepted
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    site_rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = scrapes[-1][1]
    for name, p in privacy["sites"].items():
        assert last[("fedsecure_epsilon_spent", (("site", name),))] == pytest.approx(p["epsilon_spent"])
        assert last[("fedsecure_epsilon_spent", (("site", name),))] == pytest.approx(
            [r for r in site_rows if r.get("site") == name and "epsilon" in r][-1]["epsilon"])
        assert last[("fedsecure_epsilon_remaining", (("site", name),))] == pytest.approx(
            max(0.0, p["epsilon_budget"] - p["epsilon_spent"]))
        assert last[("fedsecure_site_last_round", (("site", name),))] == 2
        assert last[("fedsecure_ledger_info", (("entries", str(p["ledger_entries"])),
                                               ("head", p["dataset_ledger_head"]), ("site", name)))] == 1
    # the endpoint ends with the run
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_metrics_are_off_and_on_loopback_by_default():
    m = MetricsSettings()
    assert (m.enabled, m.host) == (False, "127.0.0.1")
    with pytest.raises(ConfigError, match="metrics.port"):
        small_config(metrics={"port": 70000})
    with pytest.raises(ConfigError, match="metrics.host"):
        small_config(metrics={"host": " "})


# ------------------------------------------------------------------------------------------- real tools
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="Debian's prometheus is not installed (.ci/run installs it)")


@needs_prometheus
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    tests = RULES.with_name("alerts_test.yml")
    out = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60,
                         cwd=tests.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


@needs_prometheus
def _query(pport: int, expr: str) -> list[dict]:
    q = urllib.parse.quote(expr)
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{pport}/api/v1/query?query={q}",
                                             timeout=10).read())["data"]["result"]


def test_a_prometheus_server_scrapes_a_running_coordinator(site_data, tmp_path, monkeypatch):
    mport, pport = _port(), _port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n  - job_name: fedsecure\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{pport}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{pport}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.5)
        original = bookkeeping.Bookkeeping.record
        seen: list[float] = []

        def record_then_wait_for_a_scrape(self, rl, loss, seconds, stopped=None):
            original(self, rl, loss, seconds, stopped)
            if rl.server_round == 1:  # the run waits here until Prometheus has scraped round 1 from it
                until = time.monotonic() + 30
                while time.monotonic() < until and not seen:
                    seen.extend(float(r["value"][1]) for r in _query(pport, "fedsecure_round") if
                                float(r["value"][1]) >= 1)
                    time.sleep(0.5)

        monkeypatch.setattr(bookkeeping.Bookkeeping, "record", record_then_wait_for_a_scrape)
        cfg = small_config(site_data, federation={"rounds": 2}, metrics={"enabled": True, "port": mport})
        summary = simulate(cfg, run_dir=tmp_path / "run")
        assert seen == [1.0], (tmp_path / "prometheus.log").read_text()[-2000:]
        budgets = {r["metric"]["site"]: float(r["value"][1])
                   for r in _query(pport, "max_over_time(fedsecure_epsilon_budget[10m])")}
        assert budgets == {s: p["epsilon_budget"] for s, p in summary["privacy"]["sites"].items()}
    finally:
        prom.terminate()
        prom.wait(timeout=30)
