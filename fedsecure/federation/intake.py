"""The coordinator reads site replies strictly: one bad site never stops a run.

Every reply field the coordinator uses is checked here before anything else touches it: exactly the
records and metric keys a reply of its status carries, each value of the right type, finite and in
range. :func:`parse_train_reply` / :func:`parse_eval_reply` return a typed reply or raise
:class:`~fedsecure.errors.ReplyRejected` with the reason, which the coordinator audits before going on
with the other sites. :func:`update_bound` bounds what an honest update can hold, so a finite but huge
update (3e38) is rejected too, and the aggregate stays finite and bounded.

The weight of a site in FedAvg is its number of training records. With attestation on, that number is
part of the DP configuration the site attests (its sampling rate q = batch / N depends on it), and a
reply whose ``num-examples`` differs from the attested value is rejected; without attestation it is at
most ``federation.max_site_records``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsecure.attestation.protocol import (
    SECAGG_UPDATE_DIGEST,
    AttestationGate,
    update_digest_payload,
    update_digest_state,
)
from fedsecure.config import ACCOUNTANTS, SimulationConfig
from fedsecure.errors import AttestationError, ReplyRejected, UpdateRejected
from fedsecure.federation import keys
from fedsecure.federation.records import from_array_record
from fedsecure.transport.codec import decode
from fedsecure.transport.session import carries_error, uplink_policy

DP_KEYS = (keys.DP_EPSILON, keys.DP_EPSILON_BUDGET, keys.DP_DELTA, keys.DP_SIGMA, keys.DP_Q, keys.DP_STEPS,
           keys.DP_MAX_GRAD_NORM)
TRAIN_KEYS = (keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.STEPS, keys.SECONDS)
#: metric keys of a train reply, by its privacy status (exactly these)
METRIC_KEYS = {
    keys.STATUS_TRAINED: frozenset((*TRAIN_KEYS, *DP_KEYS)),
    keys.STATUS_NON_PRIVATE: frozenset(TRAIN_KEYS),
    keys.STATUS_EXHAUSTED: frozenset((keys.NUM_EXAMPLES, *DP_KEYS, keys.DP_EPSILON_IF_TRAINED)),
    keys.STATUS_REFUSED: frozenset((keys.NUM_EXAMPLES,)),
}
PRIVACY_KEYS = frozenset((keys.STATUS, keys.ACCOUNTANT, keys.LEDGER_HEAD, keys.LEDGER_ENTRIES, keys.REASON))
EVAL_KEYS = frozenset((keys.NUM_EXAMPLES, keys.EVAL_LOSS, keys.EVAL_TOKENS, keys.SECONDS))
SITE_KEYS = frozenset((keys.SITE_NAME, keys.DATASET_FINGERPRINT))
MAX_REASON = 4096
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: AdamW (betas 0.9, 0.999) moves a coordinate by at most lr * this per step, in the limit (see adam_movement)
ADAM_STEP_BOUND = 0.1 / math.sqrt(0.001) / math.sqrt(1 - 0.9**2 / 0.999)


def adam_movement(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The most ``steps`` Adam steps can move one coordinate, in units of the learning rate (no weight decay).

    At step t, m_t = (1 - b1) sum_k b1^k g_(t-k) and v_t = (1 - b2) sum_k b2^k g_(t-k)^2 over k < t, so by
    Cauchy-Schwarz |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_(k<t) (b1^2 / b2)^k), with equality
    for gradients growing like (b2 / b1)^t; the bias corrections multiply it by sqrt(1 - b2^t) / (1 - b1^t),
    and Adam's eps only lowers it. Summed over the steps. It tends to 7.27 per step; early steps move at most
    about one learning rate each.
    """
    t = np.arange(1, min(int(steps), 1_000_000) + 1, dtype=np.float64)
    r = beta1**2 / beta2
    partial = (1 - r**t) / (1 - r)
    per_step = (1 - beta1) / math.sqrt(1 - beta2) * np.sqrt(partial) * np.sqrt(1 - beta2**t) / (1 - beta1**t)
    return float(per_step.sum()) + max(0, int(steps) - 1_000_000) * ADAM_STEP_BOUND


@dataclass(frozen=True)
class TrainReply:
    """A site's train reply, every field checked."""

    status: str
    site: str
    dataset: str
    records: int  # the FedAvg weight (0 unless trained)
    train_loss: float | None  # None when no record was sampled in any step
    steps: int
    seconds: float
    dp: dict[str, float]  # DP_KEYS (and epsilon-if-trained) when the site reports them
    accountant: str
    ledger_head: str
    ledger_entries: int
    reason: str
    payload: bytes | None
    arrays: ArrayRecord | None
    statement: dict[str, Any] | None

    @property
    def counts(self) -> bool:
        """Whether this reply carries an update (trained, privately or not)."""
        return self.status in (keys.STATUS_TRAINED, keys.STATUS_NON_PRIVATE)


@dataclass(frozen=True)
class EvalReply:
    """A site's evaluation reply, every field checked."""
    site: str
    loss: float
    tokens: int
    records: int
    seconds: float


def _exact(what: str, found: Mapping[str, Any] | RecordDict, expected: frozenset[str] | set[str]) -> None:
    got = set(found.keys())
    if got != set(expected):
        extra, missing = sorted(got - set(expected)), sorted(set(expected) - got)
        parts = ([f"unexpected {', '.join(map(repr, extra))[:200]}"] if extra else []) + \
                ([f"missing {', '.join(map(repr, missing))}"] if missing else [])
        raise ReplyRejected(f"malformed reply: {what} has {'; '.join(parts)}")


def _record(content: RecordDict, key: str, kind: type) -> Any:
    rec = content[key]
    if not isinstance(rec, kind):
        raise ReplyRejected(f"malformed reply: {key!r} is a {type(rec).__name__}, not a {kind.__name__}")
    return rec


def _int(rec: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ReplyRejected(f"malformed reply: {key} = {v!r:.60} is not an integer in [{lo}, {hi}]")
    return int(v)


def _float(rec: Mapping[str, Any], key: str, lo: float, hi: float, *, nan: bool = False, inf: bool = False) -> float:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ReplyRejected(f"malformed reply: {key} = {v!r:.60} is not a number")
    v = float(v)
    if math.isnan(v):
        if nan:
            return v
        raise ReplyRejected(f"malformed reply: {key} is NaN")
    if math.isinf(v) and not (inf and v > 0):
        raise ReplyRejected(f"malformed reply: {key} = {v} is not finite")
    if not (lo <= v <= hi or (inf and v == math.inf)):
        raise ReplyRejected(f"malformed reply: {key} = {v:g} is out of range [{lo:g}, {hi:g}]")
    return v


def _str(rec: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None, limit: int = 256) -> str:
    v = rec[key]
    if not isinstance(v, str) or len(v) > limit or (pattern is not None and not pattern.match(v)):
        raise ReplyRejected(f"malformed reply: {key} = {v!r:.60} is not a valid value")
    return v


def _site(content: RecordDict) -> tuple[str, str]:
    rec = _record(content, keys.SITE, ConfigRecord)
    _exact("the site record", rec, SITE_KEYS)
    return _str(rec, keys.SITE_NAME, _NAME), _str(rec, keys.DATASET_FINGERPRINT, _HEX64)


def parse_train_reply(content: RecordDict, cfg: SimulationConfig) -> TrainReply:
    """A site's train reply, checked field by field; raises ReplyRejected with the reason."""
    try:
        return _parse_train(content, cfg)
    except ReplyRejected:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # belt and braces: never let one escape
        raise ReplyRejected(f"malformed reply ({type(e).__name__}: {str(e)[:200]})") from None


def _parse_train(content: RecordDict, cfg: SimulationConfig) -> TrainReply:
    base = {keys.METRICS, keys.SITE, keys.PRIVACY}
    missing = sorted(base - set(content.keys()))
    if missing:
        raise ReplyRejected(f"malformed reply: the reply has missing {', '.join(map(repr, missing))}")
    priv = _record(content, keys.PRIVACY, ConfigRecord)
    status = priv.get(keys.STATUS)
    if status not in METRIC_KEYS:
        raise ReplyRejected(f"malformed reply: unknown privacy status {status!r:.60}")
    counts = status in (keys.STATUS_TRAINED, keys.STATUS_NON_PRIVATE)
    expected = set(base)
    if counts:
        update_keys = {keys.UPDATE, keys.ARRAYS} & set(content.keys())
        if cfg.federation.secure_aggregation.enabled:
            if update_keys:
                raise ReplyRejected("malformed reply: under secure aggregation a trained reply carries no update "
                                    "(it travels masked in the round's secure-aggregation messages)")
        elif len(update_keys) != 1:
            raise ReplyRejected("malformed reply: a trained reply carries exactly one update (encoded or arrays)")
        expected |= update_keys
        if keys.ATTESTATION in content:
            expected.add(keys.ATTESTATION)
    _exact("the reply", content, expected)
    name, dataset = _site(content)
    m = _record(content, keys.METRICS, MetricRecord)
    _exact(f"the metrics of a {status!r} reply", m, METRIC_KEYS[status])
    if status == keys.STATUS_NON_PRIVATE:
        _exact("the privacy record of a non-private reply", priv, {keys.STATUS})
        accountant, head, entries, reason = "", "", 0, ""
    else:
        _exact("the privacy record", priv, PRIVACY_KEYS)
        accountant = _str(priv, keys.ACCOUNTANT)
        if accountant not in ACCOUNTANTS:
            raise ReplyRejected(f"malformed reply: accountant {accountant!r:.40} is not one of "
                                f"{', '.join(ACCOUNTANTS)}")
        head = _str(priv, keys.LEDGER_HEAD, _HEX64)
        entries = _int(priv, keys.LEDGER_ENTRIES, 0, 1 << 40)
        reason = _str(priv, keys.REASON, limit=MAX_REASON)
    records = _int(m, keys.NUM_EXAMPLES, 1 if counts else 0, cfg.federation.max_site_records if counts else 0)
    dp: dict[str, float] = {}
    if keys.DP_EPSILON in m:
        spent_inf = status == keys.STATUS_EXHAUSTED  # a dataset once released without DP has spent infinity
        dp = {"epsilon": _float(m, keys.DP_EPSILON, 0.0, 1e6, inf=spent_inf),
              "epsilon_budget": _float(m, keys.DP_EPSILON_BUDGET, 0.0, 100.0),
              "delta": _float(m, keys.DP_DELTA, 0.0, 0.01),
              "sigma": _float(m, keys.DP_SIGMA, 0.0 if not counts else 1e-3, 1e3),
              "q": _float(m, keys.DP_Q, 0.0, 1.0),
              "steps": float(_int(m, keys.DP_STEPS, 0, 1 << 31)),
              "max_grad_norm": _float(m, keys.DP_MAX_GRAD_NORM, 0.0, 1e6)}
        if keys.DP_EPSILON_IF_TRAINED in m:
            dp["epsilon_if_trained"] = _float(m, keys.DP_EPSILON_IF_TRAINED, -1.0, 1e9)
    loss, steps, seconds = None, 0, 0.0
    if counts:
        loss = _float(m, keys.TRAIN_LOSS, 0.0, 1e6, nan=True)
        loss = None if math.isnan(loss) else loss
        steps = _int(m, keys.STEPS, 0, 1 << 31)
        seconds = _float(m, keys.SECONDS, 0.0, 1e7)
    payload = arrays = None
    if keys.UPDATE in expected:
        upd = _record(content, keys.UPDATE, ConfigRecord)
        _exact("the update record", upd, {keys.PAYLOAD})
        payload = upd[keys.PAYLOAD]
        if not isinstance(payload, bytes):
            raise ReplyRejected("malformed reply: the update payload is not bytes")
    elif keys.ARRAYS in expected:
        arrays = _record(content, keys.ARRAYS, ArrayRecord)
    statement = None
    if keys.ATTESTATION in expected:
        statement = dict(_record(content, keys.ATTESTATION, ConfigRecord))
    return TrainReply(status, name, dataset, records, loss, steps, seconds, dp, accountant, head, entries, reason,
                      payload, arrays, statement)


def parse_eval_reply(content: RecordDict, cfg: SimulationConfig) -> EvalReply:
    """A site's evaluation reply, checked field by field; raises ReplyRejected with the reason."""
    try:
        _exact("the reply", content, {keys.METRICS, keys.SITE})
        name, _ = _site(content)
        m = _record(content, keys.METRICS, MetricRecord)
        _exact("the evaluation metrics", m, EVAL_KEYS)
        return EvalReply(name, _float(m, keys.EVAL_LOSS, 0.0, 1e6), _int(m, keys.EVAL_TOKENS, 0, 1 << 50),
                         _int(m, keys.NUM_EXAMPLES, 0, cfg.federation.max_site_records),
                         _float(m, keys.SECONDS, 0.0, 1e7))
    except ReplyRejected:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ReplyRejected(f"malformed reply ({type(e).__name__}: {str(e)[:200]})") from None


def adam_bound(cfg: SimulationConfig, global_state: Mapping[str, np.ndarray]) -> float:
    """How far ``train.local_steps`` AdamW steps can move any value of the adapter, whatever the gradients and the
    DP noise (see :func:`update_bound`): ``lr M + steps lr wd (P + lr M)``.
    """
    t = cfg.train
    p = max((float(np.max(np.abs(v))) for v in global_state.values() if v.size), default=0.0)
    move = t.learning_rate * adam_movement(t.local_steps)
    return move + t.local_steps * t.learning_rate * t.weight_decay * (p + move)


def update_bound(cfg: SimulationConfig, server_round: int, global_state: Mapping[str, np.ndarray],
                 name: str) -> float:
    """The largest absolute value an honest site's decoded update can hold in tensor ``name``.

    A site runs ``train.local_steps`` AdamW steps (betas 0.9, 0.999) at ``train.learning_rate``, a fresh
    optimizer each round: :func:`adam_movement` bounds how far they move a coordinate (M learning rates),
    whatever the gradients and the DP noise, and decoupled weight decay adds at most lr * wd * |p| per step:
    B = lr * M + steps * lr * wd * (P + lr * M), P = the largest |value| of the global adapter. The codec
    adds at most half a dither step
    (k x RMS <= k B) or one blockwise-quantization step (<= B / (2^(bits-1) - 1)), and error feedback may
    carry what earlier rounds of this run left out (up to ``server_round`` x that). A 1% margin covers float
    rounding. ``federation.max_update_norm`` (an L2 cap on the whole update) is checked separately.
    """
    bound = adam_bound(cfg, global_state)
    ts = cfg.transport
    if ts.enabled:
        policy = uplink_policy(ts)
        rule = policy.rule(name)
        if rule.dither > 0:  # step = max(k x RMS, max / 6.5) and the error is at most half a step
            bound *= 1 + max(rule.dither, 1 / 6.5) / 2
        elif rule.bits < 32:
            bound *= 1 + 1 / (2 ** (rule.bits - 1) - 1)
        if ts.error_feedback and carries_error(rule, policy.stochastic):
            bound *= max(1, server_round)
    return bound * 1.01


def check_update(delta: Mapping[str, np.ndarray], cfg: SimulationConfig, server_round: int,
                 global_state: Mapping[str, np.ndarray]) -> None:
    """Raise ReplyRejected when a decoded update is not finite or exceeds what an honest site can send."""
    total = 0.0
    for name, v in delta.items():
        if not np.all(np.isfinite(v)):
            raise ReplyRejected("update rejected: it holds NaN or infinite values")
        peak = float(np.max(np.abs(v))) if v.size else 0.0
        bound = update_bound(cfg, server_round, global_state, name)
        if peak > bound:
            raise ReplyRejected(f"update rejected: |{name}| reaches {peak:.3g}, over {bound:.3g}, the most "
                                f"{cfg.train.local_steps} AdamW steps at learning rate {cfg.train.learning_rate:g} "
                                "can move it")
        total += float(np.sum(np.square(v, dtype=np.float64)))
    cap = cfg.federation.max_update_norm
    if cap is not None and math.sqrt(total) > cap:
        raise ReplyRejected(f"update rejected: its L2 norm {math.sqrt(total):.3g} is over federation.max_update_norm "
                            f"= {cap:g}")


def decode_update(tr: TrainReply, expected, max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
    """A site's update, decoded strictly, and its bytes on the wire; raises ReplyRejected."""
    if tr.payload is None:
        assert tr.arrays is not None
        try:
            delta = from_array_record(tr.arrays)
        except (ValueError, TypeError):
            raise ReplyRejected("update rejected: malformed arrays") from None
        if [(k, tuple(v.shape)) for k, v in sorted(delta.items())] != expected:
            raise ReplyRejected("update rejected: its tensors do not match the adapter")
        return delta, tr.arrays.count_bytes()
    try:
        delta = decode(tr.payload, expected, max_bytes=max_bytes)
    except UpdateRejected as e:
        raise ReplyRejected(f"update rejected: {e}") from None
    return delta, len(tr.payload)


def attest_reply(gate: AttestationGate, tr: TrainReply, node: int, name: str, server_round: int) -> tuple[str, bool]:
    """Check the reply's attestation statement: ("verified (...)", True), or ("rejected: <why>", False). The
    DP numbers the reply reports, and its FedAvg weight, must be the ones the site attested.
    """
    try:
        if tr.payload is None and tr.arrays is None:  # secure aggregation: the update travels masked
            digest = SECAGG_UPDATE_DIGEST
        else:
            digest = update_digest_payload(tr.payload) if tr.payload is not None else \
                update_digest_state(from_array_record(tr.arrays))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        digest = b""  # malformed update: the signature check fails, and so would decoding
    reported: dict[str, float] = {"records": float(tr.records)}
    if tr.dp:
        reported.update(sigma=tr.dp["sigma"], epsilon_budget=tr.dp["epsilon_budget"], delta=tr.dp["delta"])
    try:
        claims = gate.check(node, name, server_round, tr.statement, digest, reported)
    except AttestationError as e:
        return f"rejected: {e}", False
    return f"verified ({claims.tee}, measurement {claims.measurement[:12]})", True
