"""Coordinator side: the round loop that ``server/app.py`` runs on a Flower Grid.

Flower's ``Strategy.start`` offers a single ``evaluate_fn`` hook; fedsecure needs per-round
persistence, per-site metrics, federated evaluation of the initial adapter, retirement of sites
whose budget is spent and privacy reporting, so it drives Flower's ``FedAvg`` methods
(``configure_*`` / ``aggregate_*``) from its own loop, as FlowerTune does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsecure.attestation.policy import load_policy
from fedsecure.attestation.protocol import AttestationGate, update_digest_payload, update_digest_state
from fedsecure.audit import AuditLog
from fedsecure.config import SimulationConfig
from fedsecure.errors import AttestationError, ConfigError, FedSecureError, ReplyRejected, UpdateRejected
from fedsecure.federation import keys
from fedsecure.federation.intake import TrainReply, check_update, parse_eval_reply, parse_train_reply
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.model import adapter_state, apply_delta, attach_lora, load_model_and_tokenizer
from fedsecure.privacy import report
from fedsecure.privacy.client_dp import ClientLevelDP
from fedsecure.runs import RunDir
from fedsecure.transport.codec import decode, expected_manifest
from fedsecure.transport.session import DownlinkTracker

log = logging.getLogger(__name__)

#: Callables told about every finished round (the CLI's progress display); in-process engine only.
OBSERVERS: list = []
#: The coordinator's checkpoint in the run directory, rewritten atomically after every completed round.
CHECKPOINT = "coordinator-state.json"

def site_name(reply: Message, known: dict[int, str] | None = None) -> str:
    """The site that sent ``reply``. Error replies carry no content, so ``known`` (node id -> name,
    filled from earlier replies) names them."""
    node = reply.metadata.src_node_id
    known = {} if known is None else known
    if reply.has_content():
        site = reply.content.config_records.get(keys.SITE)
        if site and keys.SITE_NAME in site:
            known[node] = str(site[keys.SITE_NAME])
    return known.get(node, f"node-{node}")


def quiet_flower_logs(verbose: bool) -> None:
    """Flower configures its "flwr" logger (own handler, DEBUG) at import; tame it for the CLI."""
    import flwr.common.logger  # noqa: F401 - importing it is what installs the handler

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # it has its own handler; avoid printing each line twice
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _clean(name: str, tr: TrainReply, delta: dict[str, np.ndarray], reply: Message) -> Message:
    """The reply as Flower's FedAvg sees it: only the checked delta and weight, nothing else the site sent."""
    reply.content = RecordDict({keys.ARRAYS: to_array_record(delta),
                                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: tr.records}),
                                keys.SITE: ConfigRecord({keys.SITE_NAME: name})})
    return reply


class SiteOrderedFedAvg(FedAvg):
    """FedAvg over adapter *deltas*, weighted by each site's record count.

    Replies are aggregated in site-name order so that the floating-point sum, and hence the
    global adapter, is identical whatever order the engine delivered them in. With client-level
    DP on, the weighted mean is replaced by clip + sum + noise over a fixed denominator.
    """

    def __init__(self, *args: Any, client_dp: ClientLevelDP | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_dp = client_dp
        self.sampled = 0
        self.total = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[override]
        ok = sorted((m for m in replies if not m.has_error()), key=site_name)
        if self.client_dp is None or not ok:
            return super().aggregate_train(server_round, ok)
        deltas = [from_array_record(m.content[keys.ARRAYS]) for m in ok]
        noisy = self.client_dp.aggregate(deltas, sampled=max(self.sampled, len(ok)), total=max(self.total, 1))
        _, metrics = super().aggregate_train(server_round, ok)
        return to_array_record(noisy), metrics


def initial_adapter(cfg: SimulationConfig) -> dict[str, np.ndarray]:
    """The round-0 global adapter: LoRA A random (seeded), LoRA B zero, so the model starts as the base."""
    base, _ = load_model_and_tokenizer(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = attach_lora(base, cfg.model.lora)
    return adapter_state(model)


@dataclass
class RoundLog:
    """What the coordinator learned in one round, per site."""

    server_round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    attestation: dict[str, str] = field(default_factory=dict)  # site -> "verified (...)" | "rejected: ..."

    def site(self, name: str) -> dict[str, Any]:
        return self.sites.setdefault(name, {"round": self.server_round, "site": name})


def _weighted_eval(entries: Iterable[dict[str, Any]]) -> float | None:
    pairs = [(e["eval_loss"], e["eval_tokens"]) for e in entries if e.get("eval_tokens")]
    tokens = sum(t for _, t in pairs)
    return sum(loss * t for loss, t in pairs) / tokens if tokens else None


class Coordinator:
    """Runs ``cfg.federation.rounds`` rounds on ``grid`` and records everything in ``run_dir``."""

    def __init__(self, cfg: SimulationConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        fed = cfg.federation
        client_dp = None
        if cfg.privacy.client_dp.enabled:
            client_dp = ClientLevelDP(cfg.privacy.client_dp, cfg.privacy.accountant,
                                      seed=cfg.privacy.client_dp.noise_seed)
        self.strategy = SiteOrderedFedAvg(
            fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites,
            arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG, client_dp=client_dp)
        self.history: list[dict[str, Any]] = []
        self.retired: dict[int, str] = {}  # node id -> site name, budget exhausted
        self.known_sites: dict[int, str] = {}  # node id -> site name
        self.downlink = DownlinkTracker(cfg.transport) if cfg.transport.enabled else None
        self.bytes_down: dict[int, int] = {}  # node id -> bytes of the last message sent to it
        self.privacy_sites: dict[str, dict[str, Any]] = {}
        self.retired_names: set[str] = set()  # from a checkpoint: retired before a restart
        self.audit = AuditLog(run_dir.path / "audit.log")
        self.gate: AttestationGate | None = None
        if cfg.attestation.enabled:
            if not cfg.attestation.policy:
                raise ConfigError("attestation.enabled is true but attestation.policy is not set. Fix: point it at "
                                  "the consortium's policy file (see configs/attestation-policy.example.yaml), or "
                                  "set attestation.enabled=false to accept unattested updates.")
            self.gate = AttestationGate(load_policy(cfg.attestation.policy), self.audit)
        else:
            log.warning("attestation is off: updates are accepted without evidence of the code and DP settings "
                        "that produced them")

    # ------------------------------------------------------------------ evaluation
    def _per_node(self, template: list[Message], state: dict[str, np.ndarray], arrays: ArrayRecord,
                  server_round: int, challenge: bool = False) -> list[Message]:
        """One message per node: the plain adapter, or (transport on) the encoded difference to what
        that node already holds; with ``challenge``, a fresh attestation nonce for that node."""
        out = []
        for m in template:
            node = m.metadata.dst_node_id
            config = ConfigRecord({keys.SERVER_ROUND: server_round})
            if challenge and self.gate is not None:
                config[keys.ATTEST_NONCE] = self.gate.challenge(node, self.known_sites.get(node, f"node-{node}"),
                                                                server_round)
            if self.downlink is None:
                content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
                self.bytes_down[node] = arrays.count_bytes()
            else:
                payload, base = self.downlink.payload_for(node, state, seed=self.cfg.seed * 1_000_003 + server_round)
                config[keys.DOWNLINK], config[keys.DOWNLINK_BASE] = payload, base
                content = RecordDict({keys.CONFIG: config})
                self.bytes_down[node] = len(payload)
            out.append(Message(content, dst_node_id=node, message_type=m.metadata.message_type,
                               group_id=str(server_round)))
        return out

    def _failed(self, node: int, name: str, reason: str, rl: RoundLog) -> None:
        rl.failures[name] = reason
        if self.downlink is not None:
            self.downlink.forget(node)  # it may not hold what we think: send it a full adapter next time

    def _evaluate(self, grid: Grid, server_round: int, state: dict[str, np.ndarray], arrays: ArrayRecord,
                  rl: RoundLog) -> float | None:
        template = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        msgs = self._per_node(template, state, arrays, server_round)
        replies = list(grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout_s))
        answered = {m.metadata.src_node_id for m in replies}
        for msg in msgs:
            if msg.metadata.dst_node_id not in answered and self.downlink is not None:
                self.downlink.forget(msg.metadata.dst_node_id)
        for reply in replies:
            name = self._site_of(reply)
            if reply.has_error():
                self._failed(reply.metadata.src_node_id, name, reply.error.reason, rl)
                continue
            try:
                ev = parse_eval_reply(reply.content, self.cfg)
            except ReplyRejected as e:
                self._failed(reply.metadata.src_node_id, name, f"evaluation reply rejected: {e}", rl)
                continue
            values = dict(eval_loss=ev.loss, eval_tokens=ev.tokens, eval_records=ev.records,
                          eval_seconds=round(ev.seconds, 4))
            entry = rl.site(name)
            entry.update(values)
            entry["bytes_down"] = entry.get("bytes_down", 0) + self.bytes_down.get(reply.metadata.src_node_id, 0)
        return _weighted_eval(e for e in rl.sites.values() if "eval_loss" in e)

    # ------------------------------------------------------------------ privacy bookkeeping
    def _note_privacy(self, name: str, tr: TrainReply, server_round: int) -> None:
        p = self.privacy_sites.setdefault(name, report.new_site_entry(name))
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
        elif tr.status == keys.STATUS_EXHAUSTED:
            p.update(status="exhausted", reason=tr.reason)
            p["refused_rounds"].append(server_round)
        elif tr.status == keys.STATUS_REFUSED:
            p.update(status="refused", reason=tr.reason)
            p["refused_rounds"].append(server_round)

    # ------------------------------------------------------------------ checkpoint / resume
    def _config_digest(self) -> str:
        """What must not change between a run and its resumption (everything but where things live)."""
        import hashlib

        doc = self.cfg.to_dict()
        for section, key in (("data", "dir"), ("privacy", "state_dir"), ("attestation", "policy"), ("", "runs_dir")):
            (doc.get(section, {}) if section else doc).pop(key, None)
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _checkpoint(self, server_round: int, initial_loss: float | None) -> None:
        cdp = self.strategy.client_dp
        doc = {"version": 1, "round": server_round, "config_sha256": self._config_digest(),
               "initial_eval_loss": initial_loss, "retired": sorted(set(self.retired.values())),
               "privacy_sites": self.privacy_sites, "history": self.history,
               "client_dp_spends": [[sp.sigma, sp.q, sp.steps] for sp in cdp.spends] if cdp else []}
        self.run_dir.write_file(CHECKPOINT, json.dumps(doc, indent=1) + "\n")

    def _resume(self) -> tuple[int, float | None] | None:
        """(last completed round, initial loss) from the run directory's checkpoint, or None for a fresh run."""
        path = self.run_dir.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            last = int(doc["round"])
        except (ValueError, KeyError, TypeError):
            raise FedSecureError(f"{path} is damaged. Fix: restore it from backup, or start the run in a new "
                                 "run directory") from None
        if doc.get("config_sha256") != self._config_digest():
            raise ConfigError(f"{self.run_dir.path} holds a run with a different configuration (rounds, model, "
                              "privacy, transport or attestation settings changed). Fix: resume with the same "
                              "config, or use a new run directory")
        if self.run_dir.latest_round() is None or self.run_dir.latest_round() < last:
            raise FedSecureError(f"{path} says round {last} completed but its global adapter is missing. Fix: "
                                 "restore adapters/ from backup")
        self.retired_names = set(doc.get("retired", []))
        self.privacy_sites = doc.get("privacy_sites", {})
        self.history = doc.get("history", [])
        if self.strategy.client_dp is not None:
            from fedsecure.privacy.accounting import Spend

            self.strategy.client_dp.spends = [Spend(a, b, int(c)) for a, b, c in doc.get("client_dp_spends", [])]
        self.audit.append("run.resumed", after_round=last, retired=sorted(self.retired_names))
        return last, doc.get("initial_eval_loss")

    def _wait_for_sites(self, grid: Grid) -> None:
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

    def _retire_known(self) -> None:
        for node, name in self.known_sites.items():
            if name in self.retired_names:
                self.retired[node] = name

    # ------------------------------------------------------------------ the loop
    def run(self, grid: Grid) -> dict[str, Any]:
        cfg = self.cfg
        meta = {"model": cfg.model.path or str(cfg.model.preset), "lora_r": str(cfg.model.lora.r)}
        resumed = self._resume()
        stopped = None
        self._wait_for_sites(grid)
        if resumed is None:
            first = 1
            state = initial_adapter(cfg)
            self.run_dir.save_global_adapter(0, state, meta)
            arrays = to_array_record(state)
            rl0 = RoundLog(0)
            t0 = time.perf_counter()
            initial_loss = self._evaluate(grid, 0, state, arrays, rl0)
            self._record(rl0, initial_loss, time.perf_counter() - t0)
            self._checkpoint(0, initial_loss)
            log.info("round 0: held-out loss %.4f", initial_loss or float("nan"))
        else:
            last, initial_loss = resumed
            first = last + 1
            state = self.run_dir.load_global_adapter(last)
            arrays = to_array_record(state)
            # learn which node is which site (retired sites are known by name) with one evaluation
            self._evaluate(grid, last, state, arrays, RoundLog(last))
            self._retire_known()
            log.warning("resuming after round %d of %d from %s", last, cfg.federation.rounds, self.run_dir.path)
        fp32_bytes = arrays.count_bytes()

        for server_round in range(first, cfg.federation.rounds + 1):
            rl = RoundLog(server_round)
            t_round = time.perf_counter()
            self._retire_known()
            template = [m for m in self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
                        if m.metadata.dst_node_id not in self.retired]
            msgs = self._per_node(template, state, arrays, server_round, challenge=True)
            expected = expected_manifest({k: v.shape for k, v in state.items()})
            self.strategy.sampled = len(msgs)
            self.strategy.total = len(list(grid.get_node_ids()))
            replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout_s)) if msgs else []
            answered = {m.metadata.src_node_id for m in replies}
            for msg in msgs:
                node = msg.metadata.dst_node_id
                if node not in answered:
                    self._failed(node, self.known_sites.get(node, f"node-{node}"), "no reply before the round timeout",
                                 rl)
            ok: list[tuple[str, TrainReply, dict[str, np.ndarray], Message]] = []
            for reply in replies:
                name = self._site_of(reply)
                if reply.has_error():
                    self._failed(reply.metadata.src_node_id, name, reply.error.reason, rl)
                    log.warning("round %d: %s failed: %s", server_round, name, reply.error.reason)
                    continue
                try:
                    taken = self._take_train_reply(reply, name, server_round, rl, expected, fp32_bytes, state)
                except ReplyRejected as e:
                    self._reject(reply.metadata.src_node_id, name, server_round, rl, str(e))
                    continue
                if taken is not None:
                    ok.append((name, *taken, reply))
            if self.gate is not None:
                self.gate.close_round(server_round)
            if len(ok) < cfg.federation.min_sites:
                active = len(list(grid.get_node_ids())) - len(self.retired)
                stopped = ("privacy budget exhausted at too many sites" if active < cfg.federation.min_sites
                           else "too few sites answered")
                log.error("round %d: %d usable replies < federation.min_sites=%d: %s; ending the run, results "
                          "saved", server_round, len(ok), cfg.federation.min_sites, stopped)
                self._record(rl, None, time.perf_counter() - t_round, stopped=stopped)
                break
            delta_record, _ = self.strategy.aggregate_train(server_round, [_clean(*x) for x in ok])
            assert delta_record is not None
            state = apply_delta(state, from_array_record(delta_record))
            arrays = to_array_record(state)
            self.run_dir.save_global_adapter(server_round, state, meta)
            self.audit.append("round.aggregated", round=server_round, sites=sorted(x[0] for x in ok),
                              weights={x[0]: x[1].records for x in sorted(ok, key=lambda x: x[0])})
            loss = self._evaluate(grid, server_round, state, arrays, rl)
            self._record(rl, loss, time.perf_counter() - t_round)
            self._checkpoint(server_round, initial_loss)
            log.info("round %d: held-out loss %.4f", server_round, loss or float("nan"))

        return self._finish(initial_loss, stopped)

    def _reject(self, node: int, name: str, server_round: int, rl: RoundLog, reason: str) -> None:
        self._failed(node, name, reason, rl)
        self.audit.append("update.rejected", site=name, round=server_round, reason=reason)
        log.warning("round %d: %s: %s", server_round, name, reason)

    def _retire(self, node: int, name: str, server_round: int, rl: RoundLog, event: str, reason: str) -> None:
        self.retired[node] = name
        rl.refused.append(name)
        self.audit.append(event, site=name, round=server_round, reason=reason)

    def _take_train_reply(self, reply: Message, name: str, server_round: int, rl: RoundLog, expected,
                          fp32_bytes: int, state: dict[str, np.ndarray]
                          ) -> tuple[TrainReply, dict[str, np.ndarray]] | None:
        """Strict reading, privacy bookkeeping, attestation and decoding of one train reply; (reply, delta) if its
        update counts. A malformed reply raises ReplyRejected (the caller audits it and goes on)."""
        node = reply.metadata.src_node_id
        tr = parse_train_reply(reply.content, self.cfg)
        self._note_privacy(name, tr, server_round)
        if tr.status == keys.STATUS_EXHAUSTED:
            log.warning("round %d: %s retired: privacy budget exhausted (%s)", server_round, name, tr.reason)
            self._retire(node, name, server_round, rl, "site.retired", "privacy budget exhausted")
            return None
        if tr.status == keys.STATUS_REFUSED:
            log.warning("round %d: %s refused the run's privacy settings and is retired: %s", server_round, name,
                        tr.reason)
            self._retire(node, name, server_round, rl, "site.refused", tr.reason)
            rl.failures[name] = f"refused by the site: {tr.reason}"
            return None
        rejected = self._attest(tr, node, name, server_round, rl)
        if rejected is not None:
            self._failed(node, name, rejected, rl)
            log.warning("round %d: %s: %s", server_round, name, rejected)
            if self.gate is not None and self.gate.policy.on_failure == "retire-site":
                self._retire(node, name, server_round, rl, "site.retired", rejected)
            return None
        delta, bytes_up = self._decode(tr, expected)
        check_update(delta, self.cfg, server_round, state)
        entry = rl.site(name)
        entry.update(train_loss=tr.train_loss, records=tr.records, steps=tr.steps,
                     train_seconds=round(tr.seconds, 4), bytes_down=self.bytes_down.get(node, 0), bytes_up=bytes_up,
                     fp32_bytes=fp32_bytes)
        if tr.dp:
            entry.update(epsilon=tr.dp["epsilon"], sigma=tr.dp["sigma"])
        return tr, delta

    def _site_of(self, reply: Message) -> str:
        """The reply's site name, bound to its node for the whole run: a node cannot switch names, nor take a
        name another node already uses (it would take over that site's records); such a claim is ignored."""
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

    def _attest(self, tr: TrainReply, node: int, name: str, server_round: int, rl: RoundLog) -> str | None:
        """Check the reply's attestation statement; returns the rejection reason, or None if accepted
        (or attestation is off). The attested record count must equal the reply's FedAvg weight."""
        if self.gate is None:
            return None
        try:
            if tr.payload is not None:
                digest = update_digest_payload(tr.payload)
            else:
                digest = update_digest_state(from_array_record(tr.arrays))
        except (KeyError, TypeError, ValueError):
            digest = b""  # malformed update: the signature check fails, and so would decoding
        reported: dict[str, float] = {"records": float(tr.records)}
        if tr.dp:
            reported.update(sigma=tr.dp["sigma"], epsilon_budget=tr.dp["epsilon_budget"], delta=tr.dp["delta"])
        try:
            claims = self.gate.check(node, name, server_round, tr.statement, digest, reported)
        except AttestationError as e:
            rl.attestation[name] = f"rejected: {e}"
            return f"attestation failed: {e}"
        rl.attestation[name] = f"verified ({claims.tee}, measurement {claims.measurement[:12]})"
        return None

    def _decode(self, tr: TrainReply, expected) -> tuple[dict[str, np.ndarray], int]:
        """A site's update, decoded strictly, and its bytes on the wire; raises ReplyRejected."""
        if tr.payload is None:
            try:
                delta = from_array_record(tr.arrays)
            except (ValueError, TypeError):
                raise ReplyRejected("update rejected: malformed arrays") from None
            if [(k, tuple(v.shape)) for k, v in sorted(delta.items())] != expected:
                raise ReplyRejected("update rejected: its tensors do not match the adapter")
            return delta, tr.arrays.count_bytes()
        try:
            delta = decode(tr.payload, expected, max_bytes=self.cfg.transport.max_update_bytes)
        except UpdateRejected as e:
            raise ReplyRejected(f"update rejected: {e}") from None
        return delta, len(tr.payload)

    def _record(self, rl: RoundLog, loss: float | None, seconds: float, stopped: str | None = None) -> None:
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
        for observer in OBSERVERS:
            observer(summary)

    def privacy_summary(self) -> dict[str, Any]:
        cdp = self.strategy.client_dp
        return {"unit": report.UNIT, "record_level": self.cfg.privacy.enabled,
                "accountant": self.cfg.privacy.accountant, "sites": dict(sorted(self.privacy_sites.items())),
                "client_level": cdp.summary() if cdp else {"enabled": False}}

    def _finish(self, initial_loss: float | None, stopped: str | None) -> dict[str, Any]:
        privacy = self.privacy_summary()
        self.run_dir.write_file("privacy.json", json.dumps(privacy, indent=2) + "\n")
        self.run_dir.write_file("privacy.md", report.markdown(privacy))
        evaluated = [h for h in self.history if h.get("eval_loss") is not None]
        summary = {
            "run_dir": str(self.run_dir.path),
            "rounds_completed": max(h["round"] for h in evaluated) if evaluated else 0,
            "initial_eval_loss": initial_loss,
            "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
            "rounds": self.history,
            "final_adapter": str(self.run_dir.adapter_path(self.run_dir.latest_round() or 0)),
            "stopped": stopped,
            "privacy": privacy,
            "attestation": {"enabled": self.gate is not None,
                            "policy": self.cfg.attestation.policy if self.gate is not None else None,
                            "audit_log": str(self.audit.path), "audit_head": self.audit.head,
                            "audit_entries": self.audit.count},
        }
        self.run_dir.write_summary(summary, summary_markdown(summary))
        return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# fedsecure run summary", "", f"Run directory: `{summary['run_dir']}`", "",
             "| round | held-out loss | sites trained | bytes down | bytes up | seconds | refused | failures |",
             "|---|---|---|---|---|---|---|---|"]
    for h in summary["rounds"]:
        loss = "n/a" if h["eval_loss"] is None else f"{h['eval_loss']:.4f}"
        fails = "; ".join(f"{k}: {v}" for k, v in h["failures"].items()) or "none"
        trained = "-" if h["round"] == 0 else h["sites_ok"]
        lines.append(f"| {h['round']} | {loss} | {trained} | {h['bytes_down']} | {h['bytes_up']} | "
                     f"{h['seconds']:.2f} | {', '.join(h.get('refused', [])) or '-'} | {fails} |")
    i, f = summary["initial_eval_loss"], summary["final_eval_loss"]
    if i is not None and f is not None:
        lines += ["", f"Held-out loss: {i:.4f} (initial) -> {f:.4f} (after round {summary['rounds_completed']})."]
    if summary.get("stopped"):
        lines.append(f"The run ended early: {summary['stopped']}.")
    lines.append(f"Final global adapter: `{summary['final_adapter']}`")
    att = summary.get("attestation") or {}
    if att.get("enabled"):
        lines += ["", "## Attestation", "", f"Policy: `{att['policy']}`. Audit log: `{att['audit_log']}` "
                  f"({att['audit_entries']} entries, head `{att['audit_head'][:16]}`).", "",
                  "| round | site | result |", "|---|---|---|"]
        for h in summary["rounds"]:
            for site, result in h.get("attestation", {}).items():
                lines.append(f"| {h['round']} | {site} | {result.replace('|', '/')} |")
    lines += ["", report.markdown(summary["privacy"]).replace("# Privacy summary", "## Privacy")]
    return "\n".join(lines) + "\n"
