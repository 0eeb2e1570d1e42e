"""The coordinator's Prometheus endpoint (``prometheus-client``): what a run is doing, for operators and alerts.

Off by default (``metrics.enabled``) and bound to 127.0.0.1 unless configured otherwise: the endpoint has no
authentication, and what it shows (site names, ε per site, audit head) is for the consortium's operators. Every
figure is the one the coordinator writes to ``metrics.jsonl`` and ``privacy.json`` for the same round (a test
compares them); the alert rules in ``deploy/prometheus/alerts.yml`` are written against these names.

Each instance has its own registry, so two runs in one process (tests, the in-process engine) never mix figures.
A site's own endpoint is :mod:`fedsecure.observe.site_metrics`; GPU and CPU series on both are
:mod:`fedsecure.observe.hardware`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server

from fedsecure.observe.hardware import HardwareCollector, Nvml

PREFIX = "fedsecure"
ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, math.inf)


class Endpoint:
    """A registry of its own (two runs in one process never mix figures) with this process's CPU and memory, the
    host's GPUs (dcgm-exporter names) and CPU utilisation, served over HTTP by :meth:`serve`.
    """

    def __init__(self, nvml: Nvml | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(HardwareCollector(nvml))
        self._server: Any = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread; returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class CoordinatorMetrics(Endpoint):
    """The figures of one run, updated at the end of every round and served over HTTP."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        super().__init__(nvml)
        r = self.registry
        self.round = Gauge(f"{PREFIX}_round", "Last round completed (0 = the initial evaluation)", registry=r)
        self.rounds = Counter(f"{PREFIX}_rounds_completed", "Rounds completed by this coordinator process",
                              registry=r)
        self.round_seconds = Histogram(f"{PREFIX}_round_duration_seconds", "Wall time of a round", registry=r,
                                       buckets=ROUND_BUCKETS)
        self.last_round_seconds = Gauge(f"{PREFIX}_round_last_duration_seconds", "Wall time of the last round",
                                        registry=r)
        self.bytes = Counter(f"{PREFIX}_bytes", "Bytes on the wire (adapters and updates)", ["direction"], registry=r)
        self.sites = Gauge(f"{PREFIX}_sites", "Sites by state in the last round", ["state"], registry=r)
        self.site_last_round = Gauge(f"{PREFIX}_site_last_round", "Last round a site answered usefully", ["site"],
                                     registry=r)
        self.attestation = Counter(f"{PREFIX}_attestation", "Attestation statements by result", ["result"],
                                   registry=r)
        self.rejected = Counter(f"{PREFIX}_updates_rejected", "Replies or updates rejected (failures of a round)",
                                registry=r)
        self.eval_loss = Gauge(f"{PREFIX}_eval_loss", "Held-out loss after the last round", registry=r)
        self.eps_spent = Gauge(f"{PREFIX}_epsilon_spent", "ε a site reports spent on its dataset (lifetime)",
                               ["site"], registry=r)
        self.eps_budget = Gauge(f"{PREFIX}_epsilon_budget", "ε budget a site reports", ["site"], registry=r)
        self.eps_left = Gauge(f"{PREFIX}_epsilon_remaining", "ε budget left (budget - spent, at least 0)", ["site"],
                              registry=r)
        self.audit = Info(f"{PREFIX}_audit_log", "The audit log's head and length", registry=r)
        self.ledger = Info(f"{PREFIX}_ledger", "A site's ledger head as it reported it", ["site"], registry=r)

    def observe_round(self, summary: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]],
                      privacy: Mapping[str, Mapping[str, Any]], retired: list[str], audit_head: str,
                      audit_entries: int) -> None:
        """One round's federation row (as written to metrics.jsonl), its per-site rows and the privacy figures."""
        rnd = int(summary["round"])
        self.round.set(rnd)
        self.rounds.inc()
        self.round_seconds.observe(float(summary["seconds"]))
        self.last_round_seconds.set(float(summary["seconds"]))
        self.bytes.labels("down").inc(int(summary.get("bytes_down", 0)))
        self.bytes.labels("up").inc(int(summary.get("bytes_up", 0)))
        if summary.get("eval_loss") is not None:
            self.eval_loss.set(float(summary["eval_loss"]))
        ok = [name for name, e in sites.items() if "train_loss" in e or rnd == 0]
        for name in ok:
            self.site_last_round.labels(name).set(rnd)
        self.sites.labels("active").set(int(summary.get("sites_ok", len(ok))))
        self.sites.labels("refused").set(len(summary.get("refused", [])))
        self.sites.labels("retired").set(len(retired))
        failures = summary.get("failures", {})
        self.rejected.inc(len([k for k, v in failures.items() if not str(v).startswith("refused by the site")]))
        for result in summary.get("attestation", {}).values():
            self.attestation.labels("accepted" if str(result).startswith("verified") else "rejected").inc()
        for name, p in privacy.items():
            spent, budget = p.get("epsilon_spent"), p.get("epsilon_budget")
            if spent is None and p.get("status") in ("exhausted", "non-private"):
                spent = math.inf
            if spent is not None:
                self.eps_spent.labels(name).set(float(spent))
            if budget is not None:
                self.eps_budget.labels(name).set(float(budget))
                self.eps_left.labels(name).set(max(0.0, float(budget) - float(spent or 0.0)))
            if p.get("dataset_ledger_head"):
                self.ledger.labels(name).info({"head": str(p["dataset_ledger_head"]),
                                               "entries": str(p.get("ledger_entries"))})
        self.audit.info({"head": audit_head, "entries": str(audit_entries)})
