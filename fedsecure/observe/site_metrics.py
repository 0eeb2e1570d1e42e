"""A site's own Prometheus endpoint: what this hospital's site did, for the hospital's operators.

Off by default (``metrics:`` in ``site.yaml``) and bound to 127.0.0.1 unless the site configures otherwise. It
is fed by the site's supervisor from the events the site writes for each message (``site-events.jsonl``, see
:mod:`fedsecure.federation.site_events`), never by the ClientApp and never by anything a coordinator sends: a
coordinator's run config cannot make a site open a port. It shows only this site's figures: its own ε spent and
remaining (the same numbers its ledger holds and it reported to the coordinator), messages by outcome, losses,
the noise multiplier, the energy its GPUs drew per round; plus the host's GPUs under dcgm-exporter's names and
CPU utilisation (:mod:`fedsecure.observe.hardware`). No record and no weight is ever in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from fedsecure.observe.hardware import Nvml
from fedsecure.observe.metrics import PREFIX, Endpoint

P = f"{PREFIX}_site"
TRAIN_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, math.inf)
#: site-events kinds (fedsecure.federation.site_events; observe sits below federation, so named here)
OUTCOMES = ("trained", "non-private", "refused", "exhausted", "failed", "evaluated", "remnant")


class SiteMetrics(Endpoint):
    """One site's figures, updated from each of its events."""

    def __init__(self, site: str, nvml: Nvml | None = None) -> None:
        super().__init__(nvml)
        r, labels = self.registry, ["site"]
        self.site = site
        self.eps_spent = Gauge(f"{P}_epsilon_spent", "ε this site spent on its dataset (its ledger, lifetime)",
                               labels, registry=r)
        self.eps_budget = Gauge(f"{P}_epsilon_budget", "This site's ε budget for its dataset", labels, registry=r)
        self.eps_left = Gauge(f"{P}_epsilon_remaining", "ε budget left (budget - spent, at least 0)", labels,
                              registry=r)
        self.messages = Counter(f"{P}_messages", "Messages this site handled, by outcome", ["site", "outcome"],
                                registry=r)
        self.last_round = Gauge(f"{P}_last_trained_round", "Last round this site trained", labels, registry=r)
        self.last_trained = Gauge(f"{P}_last_trained_timestamp_seconds", "When this site last trained (Unix time)",
                                  labels, registry=r)
        self.non_private = Gauge(f"{P}_last_round_non_private", "1 when the last round trained WITHOUT DP "
                                 "(the site's own policy allowed it)", labels, registry=r)
        self.train_loss = Gauge(f"{P}_train_loss", "Training loss of the last round", labels, registry=r)
        self.eval_loss = Gauge(f"{P}_eval_loss", "Held-out loss of the last evaluation", labels, registry=r)
        self.sigma = Gauge(f"{P}_noise_multiplier", "DP-SGD noise multiplier of the last round", labels, registry=r)
        self.records = Gauge(f"{P}_records", "Training records of the last round", labels, registry=r)
        self.train_seconds = Histogram(f"{P}_train_duration_seconds", "Wall time of local training per round",
                                       labels, registry=r, buckets=TRAIN_BUCKETS)
        self.round_energy = Gauge(f"{P}_round_energy_joules", "Energy this site's GPUs drew training the last "
                                  "round (NVML)", labels, registry=r)
        self.energy = Counter(f"{P}_energy_joules", "Energy this site's GPUs drew training (NVML)", labels,
                              registry=r)
        for outcome in OUTCOMES:  # every series exists from the start: rate() and alerts see the first one
            self.messages.labels(site, outcome)

    def _privacy(self, ev: Mapping[str, Any]) -> None:
        spent, budget = ev.get("epsilon"), ev.get("budget")
        if spent is not None:
            self.eps_spent.labels(self.site).set(float(spent))
        if budget is not None:
            self.eps_budget.labels(self.site).set(float(budget))
            self.eps_left.labels(self.site).set(max(0.0, float(budget) - float(spent or 0.0)))

    def observe(self, ev: Mapping[str, Any]) -> None:
        """One event line of ``site-events.jsonl`` (unknown kinds are ignored)."""
        kind, s = ev.get("event"), self.site
        if kind not in OUTCOMES:
            return
        self.messages.labels(s, kind).inc()
        self._privacy(ev)
        if kind == "evaluated" and ev.get("loss") is not None:
            self.eval_loss.labels(s).set(float(ev["loss"]))
        if kind not in ("trained", "non-private"):
            return
        self.last_round.labels(s).set(int(ev.get("round") or 0))
        self.last_trained.labels(s).set_to_current_time()
        self.non_private.labels(s).set(1 if kind == "non-private" else 0)
        for gauge, key in ((self.train_loss, "loss"), (self.sigma, "sigma"), (self.records, "records")):
            if ev.get(key) is not None:
                gauge.labels(s).set(float(ev[key]))
        if ev.get("seconds") is not None:
            self.train_seconds.labels(s).observe(float(ev["seconds"]))
        if ev.get("energy_j") is not None:
            self.round_energy.labels(s).set(float(ev["energy_j"]))
            self.energy.labels(s).inc(float(ev["energy_j"]))

    def restore(self, events: Path) -> None:
        """ε spent and budget as of the site's last event before this process started (counters start at 0)."""
        last = None
        if events.exists():
            for line in events.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict) and ev.get("budget") is not None:
                    last = ev
        if last is not None:
            self._privacy(last)
