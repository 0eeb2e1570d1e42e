"""Coordinator side: the round loop that ``server/app.py`` runs on a Flower Grid.

Each round: sample the sites (Flower's sampler), send each its downlink and a fresh attestation
nonce, read every reply strictly (:mod:`fedsecure.federation.intake`: one bad site never stops the
run), check its attestation, decode and bound its update, average the accepted updates in site
order (:mod:`fedsecure.federation.aggregate`, or clip + noise with client-level DP), save the sealed
global adapter, evaluate, append metrics and checkpoint (:mod:`fedsecure.federation.checkpoint`).
Privacy bookkeeping and the summary documents live in :mod:`fedsecure.federation.bookkeeping` and
:mod:`fedsecure.reports`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsecure.attestation.policy import load_policy
from fedsecure.attestation.protocol import AttestationGate
from fedsecure.audit import AuditLog
from fedsecure.config import SimulationConfig
from fedsecure.errors import ConfigError, ReplyRejected, SecAggError
from fedsecure.federation import keys
from fedsecure.federation.aggregate import RoundLog, Update, sample_sites, weighted_mean
from fedsecure.federation.bookkeeping import Bookkeeping, site_name
from fedsecure.federation.checkpoint import Checkpoint, config_digest
from fedsecure.federation.intake import (
    TrainReply,
    attest_reply,
    check_update,
    decode_update,
    parse_eval_reply,
    parse_train_reply,
)
from fedsecure.federation.records import to_array_record
from fedsecure.federation.secagg_round import Participant, SecureRound
from fedsecure.model import apply_delta, initial_adapter
from fedsecure.privacy.client_dp import ClientLevelDP
from fedsecure.store.rundir import RunDir
from fedsecure.transport.codec import expected_manifest
from fedsecure.transport.session import DownlinkTracker

log = logging.getLogger(__name__)


class Coordinator:
    """Runs ``cfg.federation.rounds`` rounds on ``grid`` and records everything in ``run_dir``."""

    def __init__(self, cfg: SimulationConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.client_dp = ClientLevelDP(cfg.privacy.client_dp, cfg.privacy.accountant,
                                       seed=cfg.privacy.client_dp.noise_seed) if cfg.privacy.client_dp.enabled else None
        self.downlink = DownlinkTracker(cfg.transport) if cfg.transport.enabled else None
        self.bytes_down: dict[int, int] = {}  # node id -> bytes of the last message sent to it
        self.audit = AuditLog(run_dir.path / "audit.log")
        self.books = Bookkeeping(cfg, run_dir, self.audit)
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
        self.secure: SecureRound | None = None
        if cfg.federation.secure_aggregation.enabled:
            self.secure = SecureRound(cfg, self.gate.node_keys if self.gate is not None else None, self.client_dp)

    # ------------------------------------------------------------------ messages
    def _messages(self, nodes: list[int], kind: str, state: dict[str, np.ndarray], server_round: int,
                  challenge: bool = False) -> list[Message]:
        """One message per node: the plain adapter, or (transport on) the encoded difference to what
        that node already holds; with ``challenge``, a fresh attestation nonce for that node.
        """
        arrays: ArrayRecord | None = to_array_record(state) if self.downlink is None else None
        out = []
        for node in nodes:
            config = ConfigRecord({keys.SERVER_ROUND: server_round})
            if challenge and self.gate is not None:
                config[keys.ATTEST_NONCE] = self.gate.challenge(node, self.books.name_of(node), server_round)
            if arrays is not None:
                content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
                self.bytes_down[node] = arrays.count_bytes()
            else:
                assert self.downlink is not None
                payload, base = self.downlink.payload_for(node, state, seed=self.cfg.seed * 1_000_003 + server_round)
                config[keys.DOWNLINK], config[keys.DOWNLINK_BASE] = payload, base
                content = RecordDict({keys.CONFIG: config})
                self.bytes_down[node] = len(payload)
            out.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(server_round)))
        return out

    def _exchange(self, grid: Grid, msgs: list[Message], rl: RoundLog) -> list[Message]:
        """Send and wait (up to the round timeout); a node that did not answer is a failure of the round."""
        replies = list(grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout_s)) if msgs else []
        answered = {m.metadata.src_node_id for m in replies}
        for msg in msgs:
            node = msg.metadata.dst_node_id
            if node not in answered and msg.metadata.message_type == MessageType.TRAIN:
                self._failed(node, self.books.name_of(node), "no reply before the round timeout", rl)
            elif node not in answered and self.downlink is not None:
                self.downlink.forget(node)
        return replies

    def _failed(self, node: int, name: str, reason: str, rl: RoundLog) -> None:
        rl.failures[name] = reason
        if self.downlink is not None:
            self.downlink.forget(node)  # it may not hold what we think: send it a full adapter next time

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, grid: Grid, server_round: int, state: dict[str, np.ndarray], rl: RoundLog) -> float | None:
        nodes = sample_sites(grid, 1.0, self.cfg.federation.min_sites)
        for reply in self._exchange(grid, self._messages(nodes, MessageType.EVALUATE, state, server_round), rl):
            node = reply.metadata.src_node_id
            name = self.books.site_of(reply)
            if reply.has_error():
                self._failed(node, name, reply.error.reason, rl)
                continue
            try:
                ev = parse_eval_reply(reply.content, self.cfg)
            except ReplyRejected as e:
                self._failed(node, name, f"evaluation reply rejected: {e}", rl)
                continue
            entry = rl.site(name)
            entry.update(eval_loss=ev.loss, eval_tokens=ev.tokens, eval_records=ev.records,
                         eval_seconds=round(ev.seconds, 4))
            entry["bytes_down"] = entry.get("bytes_down", 0) + self.bytes_down.get(node, 0)
        return rl.held_out_loss()

    # ------------------------------------------------------------------ the loop
    def run(self, grid: Grid) -> dict[str, Any]:
        """Run (or resume) the federation; returns the run summary."""
        cfg = self.cfg
        meta = {"model": cfg.model.path or str(cfg.model.preset), "lora_r": str(cfg.model.lora.r)}
        resumed = Checkpoint.read(self.run_dir, cfg)
        stopped = None
        self.books.wait_for_sites(grid)
        if resumed is None:
            first = 1
            state = initial_adapter(cfg.model, cfg.seed)
            self.run_dir.save_global_adapter(0, state, meta)
            rl0 = RoundLog(0)
            t0 = time.perf_counter()
            initial_loss = self._evaluate(grid, 0, state, rl0)
            self.books.record(rl0, initial_loss, time.perf_counter() - t0)
            self._checkpoint(0, initial_loss)
            log.info("round 0: held-out loss %.4f", initial_loss or float("nan"))
        else:
            first, initial_loss = resumed.round + 1, resumed.initial_eval_loss
            self.books.restore(resumed)
            if self.client_dp is not None:
                self.client_dp.spends = list(resumed.client_dp_spends)
                self.client_dp.distributed = list(resumed.client_dp_distributed)
            self.audit.append("run.resumed", after_round=resumed.round, retired=sorted(self.books.retired_names))
            state = self.run_dir.load_global_adapter(resumed.round)
            # learn which node is which site (retired sites are known by name) with one evaluation
            self._evaluate(grid, resumed.round, state, RoundLog(resumed.round))
            log.warning("resuming after round %d of %d from %s", resumed.round, cfg.federation.rounds,
                        self.run_dir.path)
        fp32_bytes = to_array_record(state).count_bytes()
        for server_round in range(first, cfg.federation.rounds + 1):
            rl = RoundLog(server_round)
            t_round = time.perf_counter()
            nodes = [n for n in sample_sites(grid, cfg.federation.fraction_train, cfg.federation.min_sites)
                     if not self.books.is_retired(n)]
            msgs = self._messages(nodes, MessageType.TRAIN, state, server_round, challenge=True)
            expected = expected_manifest({k: v.shape for k, v in state.items()})
            updates: list[Update] = []
            node_of: dict[str, int] = {}
            for reply in self._exchange(grid, msgs, rl):
                name = self.books.site_of(reply)
                node_of[name] = reply.metadata.src_node_id
                if reply.has_error():
                    self._failed(reply.metadata.src_node_id, name, reply.error.reason, rl)
                    log.warning("round %d: %s failed: %s", server_round, name, reply.error.reason)
                    continue
                try:
                    update = self._take_train_reply(reply, name, server_round, rl, expected, fp32_bytes, state)
                except ReplyRejected as e:
                    self._failed(reply.metadata.src_node_id, name, str(e), rl)
                    self.audit.append("update.rejected", site=name, round=server_round, reason=str(e))
                    log.warning("round %d: %s: %s", server_round, name, e)
                    continue
                if update is not None:
                    updates.append(update)
            if self.gate is not None:
                self.gate.close_round(server_round)
            if len(updates) < cfg.federation.min_sites:
                active = len(list(grid.get_node_ids())) - self.books.retired_count()
                stopped = ("privacy budget exhausted at too many sites" if active < cfg.federation.min_sites
                           else "too few sites answered")
                log.error("round %d: %d usable replies < federation.min_sites=%d: %s; ending the run, results "
                          "saved", server_round, len(updates), cfg.federation.min_sites, stopped)
                self.books.record(rl, None, time.perf_counter() - t_round, stopped=stopped)
                break
            total = len(list(grid.get_node_ids()))
            ordered = sorted(updates, key=lambda u: u.site)
            if self.secure is None:
                state = apply_delta(state, self._aggregate(updates, sampled=len(msgs), total=total))
            else:
                try:
                    mean, names = self.secure.run(grid, f"{self.run_dir.path.name}/{grid.run.run_id}", server_round,
                                                  [Participant(node_of[u.site], u.site, u.weight) for u in ordered],
                                                  state, rl, sampled=len(msgs))
                except SecAggError as e:
                    stopped = f"secure aggregation refused in round {server_round}"
                    self.audit.append("secagg.refused", round=server_round, reason=str(e))
                    log.error("round %d: %s; ending the run, results saved", server_round, e)
                    self.books.record(rl, None, time.perf_counter() - t_round, stopped=stopped)
                    break
                state = apply_delta(state, mean)
                ordered = [u for u in ordered if u.site in names]
            self.run_dir.save_global_adapter(server_round, state, meta)
            self.audit.append("round.aggregated", round=server_round, sites=[u.site for u in ordered],
                              weights={u.site: u.weight for u in ordered},
                              **({"secure_aggregation": True} if self.secure is not None else {}))
            loss = self._evaluate(grid, server_round, state, rl)
            self.books.record(rl, loss, time.perf_counter() - t_round)
            self._checkpoint(server_round, initial_loss)
            log.info("round %d: held-out loss %.4f", server_round, loss or float("nan"))
        return self.books.finish(initial_loss, stopped, self.client_dp, self.gate)

    def _aggregate(self, updates: list[Update], *, sampled: int, total: int) -> dict[str, np.ndarray]:
        """FedAvg of the accepted updates; with client-level DP, clip + sum + noise over a fixed denominator."""
        if self.client_dp is None:
            return weighted_mean(updates)
        ordered = sorted(updates, key=lambda u: u.site)
        return self.client_dp.aggregate([u.delta for u in ordered], sampled=max(sampled, len(ordered)),
                                        total=max(total, 1))

    def _checkpoint(self, server_round: int, initial_loss: float | None) -> None:
        Checkpoint(round=server_round, config_sha256=config_digest(self.cfg), initial_eval_loss=initial_loss,
                   retired=self.books.retired_list(), privacy_sites=self.books.privacy_sites,
                   history=self.books.history,
                   client_dp_spends=list(self.client_dp.spends) if self.client_dp else [],
                   client_dp_distributed=list(self.client_dp.distributed) if self.client_dp else [],
                   audit_head=self.audit.head, audit_entries=self.audit.count).write(self.run_dir)

    def _take_train_reply(self, reply: Message, name: str, server_round: int, rl: RoundLog, expected,
                          fp32_bytes: int, state: dict[str, np.ndarray]) -> Update | None:
        """Strict reading, privacy bookkeeping, attestation and decoding of one train reply; its Update if it
        counts. A malformed reply raises ReplyRejected (the caller audits it and goes on).
        """
        node = reply.metadata.src_node_id
        tr: TrainReply = parse_train_reply(reply.content, self.cfg)
        self.books.note_privacy(name, tr, server_round)
        if tr.status in (keys.STATUS_EXHAUSTED, keys.STATUS_REFUSED):
            self.books.retire_for(node, name, server_round, rl, tr)
            return None
        if self.gate is not None:
            result, accepted = attest_reply(self.gate, tr, node, name, server_round)
            rl.attestation[name] = result
            if not accepted:
                rejected = "attestation failed: " + result.removeprefix("rejected: ")
                self._failed(node, name, rejected, rl)
                log.warning("round %d: %s: %s", server_round, name, rejected)
                if self.gate.policy.on_failure == "retire-site":
                    self.books.retire(node, name, server_round, rl, "site.retired", rejected)
                return None
        if self.secure is not None:  # the update comes later, masked: only its weight counts here
            delta, bytes_up = {}, 0
        else:
            delta, bytes_up = decode_update(tr, expected, self.cfg.transport.max_update_bytes)
            check_update(delta, self.cfg, server_round, state)
        entry = rl.site(name)
        entry.update(train_loss=tr.train_loss, records=tr.records, steps=tr.steps,
                     train_seconds=round(tr.seconds, 4), bytes_down=self.bytes_down.get(node, 0), bytes_up=bytes_up,
                     fp32_bytes=fp32_bytes)
        if tr.dp:
            entry.update(epsilon=tr.dp["epsilon"], sigma=tr.dp["sigma"], q=tr.dp["q"], dp_steps=int(tr.dp["steps"]),
                         delta=tr.dp["delta"], max_grad_norm=tr.dp["max_grad_norm"])
        return Update(name, tr.records, delta)


__all__ = ["Coordinator", "site_name"]
