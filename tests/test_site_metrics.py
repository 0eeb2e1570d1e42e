"""A site's own Prometheus endpoint: scraped during a real simulated run and checked against the site's rows in
metrics.jsonl and privacy.json; its own ε only; GPU energy per round; site.yaml's metrics section."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from fedsecure.errors import ConfigError
from fedsecure.federation import bookkeeping
from fedsecure.launch.deploy_config import load_site_config
from fedsecure.launch.simulate import simulate
from fedsecure.observe import hardware
from fedsecure.observe.site_metrics import SiteMetrics

from .conftest import small_config
from .fake_nvml import FakeNvml
from .scrape import scrape as _scrape


def _trained(m: dict, site: str) -> float:
    return m.get(("fedsecure_site_messages_total", (("outcome", "trained"), ("site", site))), 0)


@pytest.mark.slow
def test_each_site_serves_its_own_figures_during_a_real_run(site_data, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_PROCESS_NVML", hardware.Nvml(FakeNvml(energy_step_mj=2000)))
    lines: list[str] = []
    ports: dict[str, int] = {}
    scrapes: list[tuple[int, dict[str, dict]]] = []
    original = bookkeeping.Bookkeeping.record

    def record_then_scrape(self, rl, loss, seconds, stopped=None):
        original(self, rl, loss, seconds, stopped)
        rnd = self.history[-1]["round"]
        for line in lines:
            if (m := re.search(r"metrics: (site-\d+)'s own endpoint on http://127.0.0.1:(\d+)/metrics", line)):
                ports[m.group(1)] = int(m.group(2))
        got = {}
        for site, port in ports.items():  # the supervisor follows the site's events: wait for this round's
            deadline = time.monotonic() + 10
            while _trained(m := _scrape(port), site) < rnd and time.monotonic() < deadline:
                time.sleep(0.05)
            got[site] = m
        scrapes.append((rnd, got))

    monkeypatch.setattr(bookkeeping.Bookkeeping, "record", record_then_scrape)
    cfg = small_config(site_data, federation={"rounds": 2}, metrics={"enabled": True, "port": 0, "site_port": 0})
    simulate(cfg, run_dir=tmp_path / "run", announce=lines.append)
    assert sorted(ports) == ["site-0", "site-1"] and len(set(ports.values())) == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())["sites"]
    assert [rnd for rnd, _ in scrapes] == [0, 1, 2]
    for rnd, got in scrapes[1:]:
        for site, m in got.items():
            row = [r for r in rows if r.get("site") == site and r.get("round") == rnd][0]
            assert _trained(m, site) == rnd
            assert m[("fedsecure_site_epsilon_spent", (("site", site),))] == pytest.approx(row["epsilon"])
            assert m[("fedsecure_site_train_loss", (("site", site),))] == pytest.approx(row["train_loss"])
            assert m[("fedsecure_site_last_trained_round", (("site", site),))] == rnd
            assert m[("fedsecure_site_last_round_non_private", (("site", site),))] == 0
            assert m[("fedsecure_site_train_duration_seconds_count", (("site", site),))] == rnd
            # its GPUs' energy (two fake GPUs, +2 J per read of each): one round's worth, and the sum
            assert m[("fedsecure_site_round_energy_joules", (("site", site),))] == pytest.approx(4.0)
            assert m[("fedsecure_site_energy_joules_total", (("site", site),))] == pytest.approx(4.0 * rnd)
            # only its own: no other site's label, none of the coordinator's per-site figures
            assert {dict(labels).get("site") for (_, labels) in m} <= {site, None}
            assert not any(name.startswith("fedsecure_epsilon") for (name, _) in m)
            assert ("DCGM_FI_DEV_GPU_TEMP", (("Hostname", hardware.socket.gethostname()), ("UUID", "GPU-bbbb-1111"),
                                             ("device", "nvidia1"), ("gpu", "1"),
                                             ("modelName", "NVIDIA H100 80GB HBM3"))) in m
    for site, m in scrapes[-1][1].items():
        p = privacy[site]
        assert m[("fedsecure_site_epsilon_spent", (("site", site),))] == pytest.approx(p["epsilon_spent"])
        assert m[("fedsecure_site_epsilon_remaining", (("site", site),))] == pytest.approx(
            p["epsilon_budget"] - p["epsilon_spent"])
    # the endpoints end with the run
    with pytest.raises(OSError):
        _scrape(ports["site-0"])
    # a supervisor started later shows the ε spent so far before its first round (from the site's events)
    later = SiteMetrics("site-0")
    later.restore(tmp_path / "run" / "sites" / "site-0" / "site-events.jsonl")
    assert later.eps_spent.labels("site-0")._value.get() == pytest.approx(privacy["site-0"]["epsilon_spent"])


def test_a_site_that_trains_without_dp_says_so_and_counts_by_outcome():
    m = SiteMetrics("h")
    for ev in [{"event": "trained", "round": 1, "epsilon": 0.5, "budget": 3.0, "loss": 2.0, "sigma": 1.1},
               {"event": "refused", "round": 2, "reason": "x"},
               {"event": "non-private", "round": 3, "records": 40},
               {"event": "exhausted", "round": 4, "epsilon": 3.2, "budget": 3.0},
               {"event": "something-new", "round": 5}]:
        m.observe(ev)
    get = lambda g, *labels: g.labels(*labels)._value.get()  # noqa: E731
    assert [get(m.messages, "h", k) for k in ("trained", "refused", "non-private", "exhausted")] == [1, 1, 1, 1]
    assert get(m.non_private, "h") == 1 and get(m.last_round, "h") == 3
    assert get(m.eps_spent, "h") == 3.2 and get(m.eps_left, "h") == 0.0  # never negative


def _site_yaml(tmp_path: Path, **metrics) -> Path:
    (tmp_path / "data").mkdir(parents=True)
    for split in ("train.jsonl", "eval.jsonl"):
        (tmp_path / "data" / split).write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(20)))
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "auth.key").write_text("x")
    site = {"name": "h", "superlink": "127.0.0.1:9092", "tls_ca": "ca.pem", "auth_key": "auth.key",
            "data_dir": "data", "state_dir": "state", "privacy": {"epsilon_budget": 3.0, "delta": 1e-5}}
    if metrics:
        site["metrics"] = metrics
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump({"site": site}))
    return p


def test_site_yaml_metrics_section(tmp_path):
    assert load_site_config(_site_yaml(tmp_path)).metrics.enabled is False  # off by default
    sc = load_site_config(_site_yaml(tmp_path / "b", enabled=True, port=9500))
    assert (sc.metrics.enabled, sc.metrics.host, sc.metrics.port) == (True, "127.0.0.1", 9500)
    assert load_site_config(_site_yaml(tmp_path / "c", enabled=True)).metrics.port == 9465
    with pytest.raises(ConfigError, match=r"site.metrics.influx_url: unknown key.*Telegraf"):
        load_site_config(_site_yaml(tmp_path / "d", influx_url="http://x:8086"))
    with pytest.raises(ConfigError, match=r"site.metrics.port"):
        load_site_config(_site_yaml(tmp_path / "e", enabled=True, port=70000))


def test_the_endpoint_knows_every_kind_of_event_a_site_writes():
    """observe sits below federation, so it names the event kinds itself: they must stay the site's own."""
    from fedsecure.federation import site_events
    from fedsecure.observe.site_metrics import OUTCOMES

    kinds = {site_events.TRAINED, site_events.REFUSED, site_events.EXHAUSTED, site_events.NON_PRIVATE,
             site_events.EVALUATED, site_events.FAILED, site_events.REMNANT}
    assert set(OUTCOMES) == kinds
