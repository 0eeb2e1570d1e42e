"""A site's side of a secure-aggregation round: the QUERY messages that follow its train message.

Under ``federation.secure_aggregation`` a site's train handler charges its ledger and keeps its update in
the node's state (:func:`keep_update`) instead of sending it. The coordinator then runs the protocol's
phases; each message restores the site's session (:class:`fedsecure.secagg.site.SiteSecAgg`, secret,
held in Flower's node state, which never leaves the node), does one phase and saves it again. The site
checks everything against its own settings: its roster of node keys (``site.secagg_roster``), that it
trained this very round of this run, that the round's modulus holds the sum without wrapping; its
update is quantized once, masked once, and forgotten when masked.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsecure.attestation.providers import load_or_create_ed25519
from fedsecure.errors import FedSecureError, SecAggError
from fedsecure.federation import keys
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.federation.site_settings import SiteRound, parse_message
from fedsecure.secagg import ddg
from fedsecure.secagg.protocol import RoundSpec, dumps, loads, unhex, vector_message
from fedsecure.secagg.quantize import quantize, round_bits
from fedsecure.secagg.roster import load_roster
from fedsecure.secagg.site import SiteSecAgg

ANNOUNCE = {"spec", "levels", "steps", "weights", "ddg"}


def keep_update(context: Context, run_id: str, server_round: int, delta: dict[str, np.ndarray]) -> None:
    """Hold this round's (DP-noised) update for the protocol; any earlier session is dropped."""
    context.state[keys.STATE_SECAGG_DELTA] = to_array_record(delta)
    context.state.config_records[keys.STATE_SECAGG_ROUND] = ConfigRecord({"run": run_id, "round": server_round})
    context.state.config_records.pop(keys.STATE_SECAGG, None)


def _forget(context: Context) -> None:
    for store, key in ((context.state.array_records, keys.STATE_SECAGG_DELTA),
                       (context.state.config_records, keys.STATE_SECAGG_ROUND)):
        store.pop(key, None)


def _announced(r: SiteRound, context: Context, doc: dict[str, Any]) -> tuple[RoundSpec, int, dict[int, Any]]:
    """(spec, this site's point, point -> roster key) of a round announcement, checked against the site's own
    settings and its pending update.
    """
    if not r.site.secagg_roster:
        raise SecAggError(f"{r.name} has no secure-aggregation roster (site.secagg_roster in its own settings). "
                          "Fix: add the consortium's roster of node keys to site.yaml, or run without "
                          "federation.secure_aggregation")
    roster = load_roster(r.site.secagg_roster)
    s = doc["spec"]
    pending = context.state.config_records.get(keys.STATE_SECAGG_ROUND)
    if pending is None or (pending["run"], pending["round"]) != (r.run_id, r.server_round) \
            or (s.get("run"), s.get("round")) != (r.run_id, r.server_round):
        raise SecAggError(f"{r.name}: no update trained in round {r.server_round} of this run waits for secure "
                          "aggregation (a replayed or out-of-order announcement)")
    pairs = s.get("sites")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise SecAggError(f"{r.name}: the round announcement's site list is malformed")
    names = [str(n) for _, n in pairs]
    if len(set(names)) != len(names) or r.name not in names:
        raise SecAggError(f"{r.name}: the round's sites {names} repeat a name or omit this site")
    least = r.site.privacy.secagg_min_sites
    if len(names) < least:
        raise SecAggError(f"{r.name}: the round sums {len(names)} sites, fewer than this site's "
                          f"site.privacy.secagg_min_sites = {least} (in a small sum, the others' updates reveal this "
                          "site's). Fix: a round with more sites, or a lower minimum in the site's own policy")
    strangers = sorted(set(names) - set(roster))
    if strangers:
        raise SecAggError(f"{r.name}: sites {strangers} are not in this site's roster; it does not aggregate with "
                          "parties it cannot authenticate")
    spec = RoundSpec(r.run_id, r.server_round, tuple(int(p) for p, _ in pairs), int(s["threshold"]),
                     int(s["length"]), int(s["bits"]))
    by_point = {int(p): roster[str(n)] for p, n in pairs}
    point = next(int(p) for p, n in pairs if n == r.name)
    return spec, point, by_point


def _reply(msg: Message, body: bytes, vector: bytes | None = None) -> Message:
    rec = ConfigRecord({keys.SECAGG_BODY: body})
    if vector is not None:
        rec[keys.SECAGG_VECTOR] = vector
    return Message(RecordDict({keys.CONFIG: rec}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """One phase of the round's protocol; a refusal is an error reply naming the reason (nothing is released)."""
    from fedsecure.federation.site import _error_reply

    phase = "?"
    try:
        r = parse_message(msg, context)
        rec = msg.content.config_records.get(keys.CONFIG)
        phase = str(rec.get(keys.SECAGG_PHASE)) if rec is not None else "?"
        body = rec.get(keys.SECAGG_BODY) if rec is not None else None
        if not isinstance(body, bytes):
            raise SecAggError("the secure-aggregation message has no body")
        node_key = load_or_create_ed25519(Path(str(r.site.state_dir)) / "attestation" / "node-key.pem")
        if phase == "advertise":
            spec, point, roster = _announced(r, context, loads(body, "round announcement", ANNOUNCE))
            session, head = SiteSecAgg(point, spec, node_key, roster), body
            reply = _reply(msg, session.advertise())
        else:
            saved = context.state.config_records.get(keys.STATE_SECAGG)
            if saved is None:
                raise SecAggError(f"{r.name}: no secure-aggregation session for this round (phase {phase!r})")
            head = saved["head"]
            doc = loads(head, "saved announcement", ANNOUNCE)
            session = SiteSecAgg.from_bytes(saved["session"], node_key, _roster_of(r, doc))
            try:
                reply = _phase(msg, context, r, session, doc, phase, body, node_key)
            finally:  # a refused phase closes the session (phase -1): later phases are refused too
                context.state.config_records[keys.STATE_SECAGG] = ConfigRecord({"head": head,
                                                                                "session": session.to_bytes()})
        if phase == "unmask":
            context.state.config_records.pop(keys.STATE_SECAGG, None)
        else:
            context.state.config_records[keys.STATE_SECAGG] = ConfigRecord({"head": head,
                                                                            "session": session.to_bytes()})
        return reply
    except FedSecureError as e:
        return _error_reply(msg, context, f"secure aggregation ({phase})", e)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed message: refuse it, never crash
        return _error_reply(msg, context, f"secure aggregation ({phase})",
                            SecAggError(f"malformed {phase!r} message ({type(e).__name__}: {str(e)[:120]})"))


def _roster_of(r: SiteRound, head: dict[str, Any]) -> dict[int, Any]:
    roster = load_roster(str(r.site.secagg_roster))
    return {int(p): roster[str(n)] for p, n in head["spec"]["sites"]}


def _phase(msg: Message, context: Context, r: SiteRound, session: SiteSecAgg, head: dict[str, Any], phase: str,
           body: bytes, node_key: Any) -> Message:
    if phase == "share":
        doc = loads(body, "adverts", {"adverts"})
        adverts = {int(k): str(v).encode() for k, v in doc["adverts"].items()}
        return _reply(msg, dumps({"shares": {str(j): v.hex() for j, v in session.share(adverts).items()}}))
    if phase == "masked":
        doc = loads(body, "routed shares", {"shares"})
        sealed = {int(k): unhex(v, None, f"shares from site {k}") for k, v in doc["shares"].items()}
        pending = context.state.config_records.get(keys.STATE_SECAGG_ROUND)
        if pending is None or (pending["run"], pending["round"]) != (session.spec.run, session.spec.round):
            raise SecAggError(f"{r.name}: no update of round {session.spec.round} waits to be masked (it is masked "
                              "once)")
        delta = from_array_record(context.state[keys.STATE_SECAGG_DELTA])
        levels, weights = int(head["levels"]), head["weights"]
        weight = weights.get(r.name)
        if not isinstance(weight, int) or weight < 1 or not all(isinstance(w, int) and w >= 1
                                                                for w in weights.values()):
            raise SecAggError(f"{r.name}: the round's weights are malformed ({weight!r} for this site)")
        if head["ddg"] is not None:  # client-level DP: clip, round and add this site's share of the noise
            noise = ddg.DDGRound.from_dict(head["ddg"])
            if session.spec.bits < noise.bits(len(session.spec.sites)):
                raise SecAggError(f"{r.name}: the round's {session.spec.bits}-bit modulus cannot hold the noised sum "
                                  "without wrapping; refused")
            seed, values = 0, ddg.encode(delta, noise)
        else:
            if session.spec.bits < round_bits(levels, list(weights.values())):
                raise SecAggError(f"{r.name}: the round's {session.spec.bits}-bit modulus cannot hold the weighted "
                                  "sum without wrapping; refused")
            seed = secrets.randbits(64)
            values = quantize(delta, head["steps"], levels, seed, weight)
        vector = session.masked_input(sealed, values)
        _forget(context)  # masked once: the update itself is no longer kept
        return _reply(msg, dumps({"seed": seed, "sig": node_key.sign(vector_message(session.spec, vector)).hex()}),
                      vector)
    if phase == "consistency":
        doc = loads(body, "surviving sites", {"u3"})
        return _reply(msg, session.consistency([int(x) for x in doc["u3"]]))
    if phase == "unmask":
        doc = loads(body, "signatures", {"sigs"})
        return _reply(msg, session.unmask({int(k): str(v).encode() for k, v in doc["sigs"].items()}))
    raise SecAggError(f"unknown secure-aggregation phase {phase!r}")
