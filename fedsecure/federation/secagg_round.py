"""The coordinator's secure-aggregation round on Flower's Message API (QUERY messages, one per phase).

After the train messages (each site trained, charged its ledger and kept its update), the coordinator
runs :mod:`fedsecure.secagg` with the sites that trained: five exchanges, each waiting at most
``federation.round_timeout_s``; a site that does not answer, answers with an error or sends anything
malformed is a dropout with its reason in the round log. It gets the weighted integer sum only, and
the dither seeds of the sites in it, so the FedAvg mean (:func:`fedsecure.secagg.quantize.mean`). With
fewer than the threshold left in any phase the round is refused: nothing is aggregated.

With client-level DP on (``privacy.client_dp``) the sites clip, round and noise their updates themselves
(:mod:`fedsecure.secagg.ddg`, the distributed discrete Gaussian): the announcement carries the round's
parameters, the sum is divided by the sites asked, and the release is recorded with the number of sites
whose noise it holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsecure.config import SimulationConfig
from fedsecure.errors import SecAggError
from fedsecure.federation import keys
from fedsecure.federation.aggregate import RoundLog
from fedsecure.federation.intake import adam_bound
from fedsecure.privacy.client_dp import ClientLevelDP
from fedsecure.secagg import ddg
from fedsecure.secagg.coordinator import Aggregation
from fedsecure.secagg.protocol import RoundSpec, dumps, loads, raw, unhex, vector_message
from fedsecure.secagg.quantize import layout, mean, round_bits, unit_weights
from fedsecure.secagg.roster import load_roster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Participant:
    """A site that trained this round: its node, name and FedAvg weight (records)."""

    node: int
    name: str
    records: int


class SecureRound:
    """Runs the protocol for one round and returns the FedAvg mean of the surviving sites' updates."""

    def __init__(self, cfg: SimulationConfig, attested_keys: dict[str, str] | None = None,
                 client_dp: ClientLevelDP | None = None) -> None:
        sa = cfg.federation.secure_aggregation
        if not sa.roster:
            raise SecAggError("federation.secure_aggregation.roster is not set. Fix: point it at the consortium's "
                              "roster of node keys (fedsecure simulate writes one)")
        self.cfg, self.roster = cfg, load_roster(sa.roster)
        self.attested = attested_keys if attested_keys is not None else {}
        self.client_dp = client_dp

    def run(self, grid: Grid, run_id: str, server_round: int, sites: list[Participant],
            state: dict[str, np.ndarray], rl: RoundLog, sampled: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
        """(the mean update, the sites in it) of the sites that finish the protocol; raises SecAggError when the
        round is refused (naming why each missing site is missing). ``sampled``: the sites asked to train (the
        fixed denominator of client-level DP).
        """
        try:
            return self._run(grid, run_id, server_round, sites, state, rl, max(sampled, len(sites)))
        except SecAggError as e:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(rl.failures.items()))
            raise SecAggError(f"{e}{' [' + why + ']' if why else ''}") from None

    def _run(self, grid: Grid, run_id: str, server_round: int, sites: list[Participant],
             state: dict[str, np.ndarray], rl: RoundLog, sampled: int) -> tuple[dict[str, np.ndarray], list[str]]:
        sa = self.cfg.federation.secure_aggregation
        ok = []
        for p in sorted(sites, key=lambda p: p.name):
            known = self.attested.get(p.name)
            if p.name not in self.roster:
                rl.failures[p.name] = "not in the secure-aggregation roster"
            elif known is not None and raw(self.roster[p.name]).hex() != known:
                rl.failures[p.name] = "its roster key is not the node key its attestation evidence binds"
            else:
                ok.append(p)
        if len(ok) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites; {len(ok)} trained and are in the roster")
        points = {p.name: i + 1 for i, p in enumerate(ok)}
        by_point = {points[p.name]: p for p in ok}
        weights = unit_weights({p.name: p.records for p in ok})
        shapes = {k: v.shape for k, v in state.items()}
        bound = adam_bound(self.cfg, state)
        steps = {k: bound / sa.levels for k in shapes}
        n = len(ok)
        threshold, length = max(n // 2 + 1, n - sa.dropouts, 2), sum(size for _, _, size in layout(shapes))
        noise = None
        if self.client_dp is not None:
            cd = self.cfg.privacy.client_dp
            noise = ddg.plan(cd.clip, cd.noise_multiplier, length, threshold)
        bits = noise.bits(n) if noise is not None else round_bits(sa.levels, list(weights.values()))
        spec = RoundSpec(run_id, server_round, tuple(range(1, n + 1)), threshold, length, bits)
        agg = Aggregation(spec, {points[p.name]: self.roster[p.name] for p in ok})
        head = {"spec": {**spec.__dict__, "sites": [[points[p.name], p.name] for p in ok]}, "levels": sa.levels,
                "steps": {k: float(v) for k, v in steps.items()}, "weights": weights,
                "ddg": noise.to_dict() if noise is not None else None}
        ask = _Exchange(grid, sa.phase_timeout_s, server_round, by_point, rl)

        adverts = agg.adverts({i: r[0] for i, r in ask("advertise", {i: head for i in by_point}).items()})
        body = {"adverts": {str(k): v.decode() for k, v in adverts.items()}}
        shares: dict[int, Any] = {}
        for i, (b, _) in ask("share", {i: body for i in agg.u1}).items():
            try:
                doc = loads(b, f"shares of site {i}", {"shares"})["shares"]
                if not isinstance(doc, dict):
                    raise SecAggError(f"shares of site {i}: not a mapping")
                shares[i] = {int(j): unhex(v, None, f"share of site {i}") for j, v in doc.items()}
            except (SecAggError, ValueError) as e:
                rl.failures[by_point[i].name] = f"secure aggregation: {e}"
        routed = agg.route(shares)
        masked, seeds = {}, {}
        for i, (b, vec) in ask("masked", {i: {"shares": {str(k): v.hex() for k, v in routed[i].items()}}
                                          for i in routed}).items():
            try:
                doc = loads(b, f"masked input of site {i}", {"seed", "sig"})
                self.roster[by_point[i].name].verify(unhex(doc["sig"], 64, "signature"), vector_message(spec, vec))
                if not (isinstance(doc["seed"], int) and 0 <= doc["seed"] < 1 << 64):
                    raise SecAggError(f"masked input of site {i}: invalid dither seed")
                masked[i], seeds[i] = vec, doc["seed"]
            except (SecAggError, InvalidSignature) as e:
                rl.failures[by_point[i].name] = str(e) or "its masked vector is not signed by its node key"
        u3 = agg.masked(masked)
        sigs = agg.signatures({i: r[0] for i, r in ask("consistency", {i: {"u3": u3} for i in u3}).items()})
        body = {"sigs": {str(k): v.decode() for k, v in sigs.items()}}
        total = agg.unmask({i: r[0] for i, r in ask("unmask", {i: body for i in sigs}).items()})
        for i, reason in agg.refused.items():
            rl.failures.setdefault(by_point[i].name, f"secure aggregation: {reason}")
        names = [by_point[i].name for i in u3]
        log.info("round %d: secure aggregation of %s (threshold %d of %d, %d-bit values)", server_round, names,
                 spec.threshold, n, spec.bits)
        for i in u3:
            rl.site(by_point[i].name)["bytes_up"] = ask.bytes_up.get(i, 0)
        if noise is not None and self.client_dp is not None:
            self.client_dp.record_distributed(noise.rho(len(u3)), sites=len(u3), sampled=sampled, sigma=noise.sigma,
                                              gamma=noise.gamma, l2=noise.l2)
            return ddg.decode(total, noise, sampled, shapes), names
        return mean(total, {by_point[i].name: seeds[i] for i in u3},
                    {by_point[i].name: weights[by_point[i].name] for i in u3}, steps, shapes), names


class _Exchange:
    """One phase: a QUERY message to each site, replies as (body, vector) by Shamir point; failures logged."""

    def __init__(self, grid: Grid, timeout: float, server_round: int, sites: dict[int, Participant],
                 rl: RoundLog) -> None:
        self.grid, self.timeout, self.round, self.sites, self.rl = grid, timeout, server_round, sites, rl
        self.bytes_up: dict[int, int] = {}

    def __call__(self, phase: str, bodies: dict[int, Any]) -> dict[int, tuple[bytes, bytes]]:
        msgs = [Message(RecordDict({keys.CONFIG: ConfigRecord({
            keys.SERVER_ROUND: self.round, keys.SECAGG_PHASE: phase, keys.SECAGG_BODY: dumps(body)})}),
            dst_node_id=self.sites[i].node, message_type=MessageType.QUERY, group_id=str(self.round))
            for i, body in bodies.items()]
        point_of = {p.node: i for i, p in self.sites.items()}
        out = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout) if msgs else []:
            i = point_of.get(reply.metadata.src_node_id)
            if i is None:
                continue
            name = self.sites[i].name
            if reply.has_error():
                self.rl.failures[name] = f"secure aggregation ({phase}): {reply.error.reason}"
                continue
            rec = reply.content.config_records.get(keys.CONFIG)
            body = rec.get(keys.SECAGG_BODY) if rec is not None else None
            vector = rec.get(keys.SECAGG_VECTOR, b"") if rec is not None else b""
            if not isinstance(body, bytes) or not isinstance(vector, bytes):
                self.rl.failures[name] = f"secure aggregation ({phase}): malformed reply"
                continue
            self.bytes_up[i] = self.bytes_up.get(i, 0) + len(body) + len(vector)
            out[i] = (body, vector)
        for i in bodies:
            if i not in out:
                self.rl.failures.setdefault(self.sites[i].name, f"secure aggregation ({phase}): no reply")
        return out
