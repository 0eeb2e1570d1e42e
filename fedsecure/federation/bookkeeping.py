"""What the coordinator keeps about the run: which node is which site, who is retired, each site's privacy
figures, the round history, and what is written at the end: the closing ``run.completed`` audit entry, then
privacy.json/md, summary.json/md and the final checkpoint, both recording the audit head after that entry
(``fedsecure audit verify`` compares the log with them). A run directory that holds a finished run is refused.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedsecure.attestation.protocol import AttestationGate
from fedsecure.audit import RUN_COMPLETED, AuditLog
from fedsecure.config import SimulationConfig
from fedsecure.federation import keys
from fedsecure.federation.aggregate import RoundLog
from fedsecure.federation.checkpoint import Checkpoint, config_digest, refuse_unusable
from fedsecure.federation.intake import TrainReply
from fedsecure.observe.influx import InfluxPusher, round_lines
from fedsecure.observe.metrics import CoordinatorMetrics
from fedsecure.privacy.client_dp import ClientLevelDP
from fedsecure.reports import privacy as privacy_report
from fedsecure.reports import run as run_report
from fedsecure.reports.report_files import write_run_report
from fedsecure.store.rundir import RunDir

log = logging.getLogger(__name__)


def site_name(reply: Message, known: dict[int, str] | None = None) -> str:
    """The site that sent ``reply``. Error replies carry no content, so ``known`` (node id -> name,
    filled from earlier replies) names them.
    """
    node = reply.metadata.src_node_id
    known = {} if known is None else known
    if reply.has_content():
        site = reply.content.config_records.get(keys.SITE)
        if site and keys.SITE_NAME in site:
            known[node] = str(site[keys.SITE_NAME])
    return known.get(node, f"node-{node}")


class Bookkeeping:
    """The coordinator's records of one run.

    Raises:
        FedSecureError: ``run_dir`` holds a finished run, a damaged checkpoint or a run with another configuration:
            refused before anything is written (the coordinator builds its records before its attestation gate
            writes its first audit entry).
    """

    def __init__(self, cfg: SimulationConfig, run_dir: RunDir, audit: AuditLog) -> None:
        refuse_unusable(run_dir, cfg)
        self.cfg, self.run_dir, self.audit = cfg, run_dir, audit
        self.known_sites: dict[int, str] = {}  # node id -> site name
        self.retired: dict[int, str] = {}  # node id -> site name: budget exhausted, refused or failed attestation
        self.retired_names: set[str] = set()  # from a checkpoint: retired before a restart
        self.privacy_sites: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.metrics: CoordinatorMetrics | None = None
        self.influx = InfluxPusher(cfg.metrics) if cfg.metrics.influx_url else None
        if cfg.metrics.enabled:
            self.metrics = CoordinatorMetrics()
            port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            log.warning("metrics: Prometheus endpoint on http://%s:%d/metrics", cfg.metrics.host, port)

    # ------------------------------------------------------------------ sites
    def name_of(self, node: int) -> str:
        """The name node ``node`` answered with so far (``node-<id>`` before its first reply)."""
        return self.known_sites.get(node, f"node-{node}")

    def site_of(self, reply: Message) -> str:
        """The reply's site name, bound to its node for the whole run: a node cannot switch names, nor take a
        name another node already uses (it would take over that site's records); such a claim is ignored.
        """
        node = reply.metadata.src_node_id
        current = self.known_sites.get(node)
        claimed = site_name(reply, {})
        if claimed == f"node-{node}":  # no name in the reply (an error reply)
            return current or claimed
        owner = next((n for n, nm in self.known_sites.items() if nm == claimed and n != node), None)
        if owner is not None or (current is not None and current != claimed):
            log.warning("node %d claims site name %s (it is %s; the name belongs to node %s); claim ignored", node,
                        claimed, current, owner)
            self.audit.append("site.name-conflict", node=node, claimed=claimed, current=current, owner=owner)
            return current or f"node-{node}"
        self.known_sites[node] = claimed
        return claimed

    def is_retired(self, node: int) -> bool:
        """Whether the site on ``node`` is not asked to train any more in this run."""
        return node in self.retired or self.known_sites.get(node) in self.retired_names

    def retired_count(self) -> int:
        """How many sites are retired."""
        return len(set(self.retired.values()) | self.retired_names)

    def retired_list(self) -> list[str]:
        """The retired sites' names."""
        return sorted(set(self.retired.values()) | self.retired_names)

    def retire(self, node: int, name: str, server_round: int, rl: RoundLog, event: str, reason: str) -> None:
        """Stop asking this site for the rest of the run; audited."""
        self.retired[node] = name
        rl.refused.append(name)
        self.audit.append(event, site=name, round=server_round, reason=reason)

    def retire_for(self, node: int, name: str, server_round: int, rl: RoundLog, tr: TrainReply) -> None:
        """A site that answered "budget exhausted" or refused the run's privacy settings is retired."""
        if tr.status == keys.STATUS_EXHAUSTED:
            log.warning("round %d: %s retired: privacy budget exhausted (%s)", server_round, name, tr.reason)
            self.retire(node, name, server_round, rl, "site.retired", "privacy budget exhausted")
        else:
            log.warning("round %d: %s refused the run's privacy settings and is retired: %s", server_round, name,
                        tr.reason)
            self.retire(node, name, server_round, rl, "site.refused", tr.reason)
            rl.failures[name] = f"refused by the site: {tr.reason}"

    def wait_for_sites(self, grid: Grid) -> None:
        """Give every site up to federation.join_timeout_s to connect before round 0 (deployment)."""
        fed = self.cfg.federation
        deadline = time.monotonic() + fed.join_timeout_s
        while (n := len(list(grid.get_node_ids()))) < fed.sites and time.monotonic() < deadline:
            log.info("waiting for sites: %d of %d connected", n, fed.sites)
            time.sleep(1.0)
        n = len(list(grid.get_node_ids()))
        if n < fed.sites:
            log.warning("%d of %d sites connected after %.0f s; going on (federation.min_sites=%d)", n, fed.sites,
                        fed.join_timeout_s, fed.min_sites)
        self.audit.append("run.sites-connected", connected=n, expected=fed.sites)

    # ------------------------------------------------------------------ privacy and history
    def note_privacy(self, name: str, tr: TrainReply, server_round: int) -> None:
        """Update site ``name``'s privacy figures from its (checked) reply."""
        p = self.privacy_sites.setdefault(name, privacy_report.new_site_entry(name))
        if tr.status == keys.STATUS_NON_PRIVATE:
            p.update(status="non-private")
            p["rounds_trained"].append(server_round)
            return
        p.update(accountant=tr.accountant, dataset_ledger_head=tr.ledger_head, ledger_entries=tr.ledger_entries)
        if tr.dp:
            p.update(epsilon_spent=tr.dp["epsilon"], epsilon_budget=tr.dp["epsilon_budget"], delta=tr.dp["delta"],
                     max_grad_norm=tr.dp["max_grad_norm"])
        if tr.status == keys.STATUS_TRAINED:
            p.update(sigma=tr.dp["sigma"], q=tr.dp["q"])
            p["steps_this_run"] += int(tr.dp["steps"])
            p["rounds_trained"].append(server_round)
        else:
            p.update(status="exhausted" if tr.status == keys.STATUS_EXHAUSTED else "refused", reason=tr.reason)
            p["refused_rounds"].append(server_round)

    def record(self, rl: RoundLog, loss: float | None, seconds: float, stopped: str | None = None) -> None:
        """Append the round's per-site rows and its federation row to ``metrics.jsonl``."""
        for entry in rl.sites.values():
            self.run_dir.append_metrics(entry)
        summary = {"round": rl.server_round, "site": "federation", "eval_loss": loss,
                   "sites_ok": len([e for e in rl.sites.values() if "train_loss" in e or rl.server_round == 0]),
                   "failures": rl.failures, "refused": rl.refused, "seconds": round(seconds, 4),
                   "bytes_down": sum(e.get("bytes_down", 0) for e in rl.sites.values()),
                   "bytes_up": sum(e.get("bytes_up", 0) for e in rl.sites.values())}
        if rl.attestation:
            summary["attestation"] = dict(sorted(rl.attestation.items()))
        if stopped:
            summary["stopped"] = stopped
        self.run_dir.append_metrics(summary)
        self.history.append(summary)
        if self.metrics is not None:
            self.metrics.observe_round(summary, rl.sites, self.privacy_sites, self.retired_list(), self.audit.head,
                                       self.audit.count)
        if self.influx is not None:
            self.influx.submit(round_lines(self.run_dir.path.name, summary, self.privacy_sites, time.time_ns()))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: retired sites, privacy figures and the history so far."""
        self.retired_names = set(checkpoint.retired)
        self.privacy_sites = checkpoint.privacy_sites
        self.history = checkpoint.history

    # ------------------------------------------------------------------ the end
    def finish(self, initial_loss: float | None, stopped: str | None, client_dp: ClientLevelDP | None,
               gate: AttestationGate | None) -> dict[str, Any]:
        """Close the audit log (``run.completed``), write privacy.json/md and summary.json/md, and the final
        checkpoint (marked finished); summary and checkpoint record the audit head after ``run.completed``.
        Returns the summary.
        """
        privacy = {"unit": privacy_report.UNIT, "record_level": self.cfg.privacy.enabled,
                   "accountant": self.cfg.privacy.accountant, "sites": dict(sorted(self.privacy_sites.items())),
                   "client_level": client_dp.summary() if client_dp else {"enabled": False}}
        self.run_dir.write_file("privacy.json", json.dumps(privacy, indent=2) + "\n")
        self.run_dir.write_file("privacy.md", privacy_report.markdown(privacy))
        evaluated = [h for h in self.history if h.get("eval_loss") is not None]
        last_round = self.run_dir.latest_round() or 0
        final_adapter = self.run_dir.adapter_path(last_round)
        rounds_completed = max(h["round"] for h in evaluated) if evaluated else 0
        self.audit.append(RUN_COMPLETED, rounds_completed=rounds_completed, stopped=stopped,
                          final_adapter=final_adapter.name)
        head, entries = self.audit.head, self.audit.count
        summary = {
            "run_dir": str(self.run_dir.path),
            "rounds_completed": rounds_completed,
            "initial_eval_loss": initial_loss,
            "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
            "rounds": self.history,
            "final_adapter": str(final_adapter),
            "stopped": stopped,
            "privacy": privacy,
            "attestation": {"enabled": gate is not None, "policy": self.cfg.attestation.policy if gate else None,
                            "audit_log": str(self.audit.path), "audit_head": head, "audit_entries": entries,
                            "audit_last_event": RUN_COMPLETED},
        }
        self.run_dir.write_summary(summary, run_report.markdown(summary))
        Checkpoint(round=last_round, config_sha256=config_digest(self.cfg), initial_eval_loss=initial_loss,
                   retired=self.retired_list(), privacy_sites=self.privacy_sites, history=self.history,
                   client_dp_spends=list(client_dp.spends) if client_dp else [],
                   client_dp_distributed=list(client_dp.distributed) if client_dp else [], audit_head=head,
                   audit_entries=entries,
                   finished={"audit_head": head, "audit_entries": entries, "rounds_completed": rounds_completed,
                             "stopped": stopped, "final_adapter": final_adapter.name}).write(self.run_dir)
        write_run_report(self.run_dir.path, self.cfg.storage.keyring)
        if self.metrics is not None:
            self.metrics.audit.info({"head": head, "entries": str(entries)})
            self.metrics.close()
        if self.influx is not None:
            self.influx.close()
        return summary
