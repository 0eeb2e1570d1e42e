"""The Prometheus endpoints (the coordinator's and each site's own): round time with metrics on vs off (goal: at
most 1.02x).

    .venv/bin/python bench/bench_metrics.py [--repeats 2] [--rounds 3]

Two measurements in one process:

* A/B: the demo configuration (3 sites, deepseek-v3-tiny, DP-SGD, sealing, codec, attestation), metrics off and
  on, interleaved ``--repeats`` times; the median wall time of rounds 2.. (round 1 carries one-off start-up).
  While metrics are on, a thread scrapes the coordinator's and the three sites' endpoints every 0.5 s, harder than
  a Prometheus server would (each scrape also reads the CPU and, where there is one, NVML).
* The direct cost: one round's update of every coordinator metric (``observe_round``) and one scrape, plus three
  sites' event updates and three site scrapes, median of 200, as a share of the median round: what the A/B ratio
  cannot resolve below the noise of a 2-core machine.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsecure.config import load_config  # noqa: E402
from fedsecure.launch.simulate import simulate  # noqa: E402
from fedsecure.observe.metrics import CoordinatorMetrics  # noqa: E402
from fedsecure.observe.site_metrics import SiteMetrics  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simulation.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(on: bool, rounds: int, tmp: Path, i: int) -> list[float]:
    port = _port()
    cfg = load_config(CONFIG, {"federation.rounds": rounds, "site.noise_seed": 1, "metrics.enabled": on,
                               "metrics.port": port, "metrics.site_port": 0})
    stop = threading.Event()
    ports = [port]

    def announce(line: str) -> None:
        if (m := re.search(r"own endpoint on http://127.0.0.1:(\d+)/metrics", line)):
            ports.append(int(m.group(1)))

    def scrape() -> None:
        while not stop.wait(0.5):
            for p in list(ports):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2).read()
                except OSError:
                    pass

    t = threading.Thread(target=scrape, daemon=True)
    if on:
        t.start()
    try:
        summary = simulate(cfg, run_dir=tmp / f"{'on' if on else 'off'}-{i}", announce=announce)
    finally:
        stop.set()
    if on:
        assert len(ports) == 1 + cfg.federation.sites, ports  # the sites' endpoints were up and scraped
    return [h["seconds"] for h in summary["rounds"] if h["round"] >= 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in ("off", "on"):
                times[mode] += _run(mode == "on", args.rounds, Path(tmp), i)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    m = CoordinatorMetrics()
    port = m.serve("127.0.0.1", 0)
    row = {"round": 2, "seconds": 3.0, "bytes_down": 47000, "bytes_up": 12000, "eval_loss": 6.5, "sites_ok": 3,
           "refused": [], "failures": {}, "attestation": {f"site-{k}": "verified (software)" for k in range(3)}}
    sites = {f"site-{k}": {"train_loss": 1.0} for k in range(3)}
    privacy = {f"site-{k}": {"epsilon_spent": 2.5, "epsilon_budget": 3.0, "dataset_ledger_head": "ab" * 32,
                             "ledger_entries": 2} for k in range(3)}
    site_endpoints = [SiteMetrics(f"site-{k}") for k in range(3)]
    site_ports = [e.serve("127.0.0.1", 0) for e in site_endpoints]
    event = {"event": "trained", "round": 2, "records": 384, "steps": 16, "loss": 6.1, "sigma": 1.2, "epsilon": 1.4,
             "budget": 3.0, "seconds": 1.8, "energy_j": None}
    cost = []
    for _ in range(200):
        t0 = time.perf_counter()
        m.observe_round(row, sites, privacy, [], "cd" * 32, 10)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        for e, p in zip(site_endpoints, site_ports, strict=True):
            e.observe(event)
            urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2).read()
        cost.append(time.perf_counter() - t0)
    m.close()
    for e in site_endpoints:
        e.close()
    direct = statistics.median(cost)
    print(f"# demo config, rounds 2..{args.rounds}, {args.repeats} interleaved repeats each; medians")
    print("| metrics | round s | x off |")
    print("| --- | --- | --- |")
    print(f"| off | {off:.3f} | 1.000 |")
    print(f"| on: coordinator + 3 site endpoints, each scraped every 0.5 s | {on:.3f} | {on / off:.3f} |")
    print(f"| direct cost per round: every metric updated + one scrape of all 4 endpoints | {direct * 1e3:.2f} ms | "
          f"{1 + direct / off:.5f} |")


if __name__ == "__main__":
    main()
