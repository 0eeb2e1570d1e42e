"""Both ends of the transport: the coordinator's downlink tracker and the site's encode/decode steps.

Downlink: the coordinator remembers, per site, the adapter that site reconstructed last time
(``views``), and sends only the encoded difference to the new global adapter, named by the hash
of the base it applies to. A site whose base differs (it restarted, or missed a message) answers
with an error carrying :data:`RESEND_FULL`, and gets a full adapter ("keyframe") next time. What
the lossy downlink drops is not lost: it stays in ``global - view`` and travels next round.

Uplink: the site encodes its DP-noised delta plus the error-feedback residual (what earlier
rounds' biased compression, top-k, dropped) and gets the new residual back. Nothing here touches a
file: the site keeps the residual sealed in its state directory
(:class:`fedsecure.store.site_state.SiteState`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedsecure.config import TransportSettings
from fedsecure.errors import FedSecureError
from fedsecure.transport.codec import CodecPolicy, TensorRule, decode, encode, expected_manifest

RESEND_FULL = "[fedsecure:resend-full-adapter]"
NO_BASE = "none"


def uplink_policy(ts: TransportSettings) -> CodecPolicy:
    """The codec policy of site -> coordinator updates."""
    return CodecPolicy(TensorRule(ts.uplink_bits, ts.uplink_topk, ts.uplink_dither),
                       CodecPolicy.parse_overrides(ts.policy), ts.zstd_level, ts.stochastic_rounding)


def downlink_policy(ts: TransportSettings, keyframe: bool) -> CodecPolicy:
    # a keyframe carries the whole adapter (not a small difference): dense int8 whatever the delta setting
    """The codec policy of coordinator -> site updates (a keyframe is dense int8)."""
    rule = TensorRule(ts.downlink_bits, 1.0) if keyframe else TensorRule(ts.downlink_bits, ts.downlink_topk,
                                                                          ts.downlink_dither)
    return CodecPolicy(rule, (), ts.zstd_level, ts.stochastic_rounding)


def carries_error(rule: TensorRule, stochastic: bool) -> bool:
    """Whether error feedback applies to a tensor sent under ``rule``: only where compression is biased
    (top-k, round to nearest). Unbiased stages (dither, stochastic rounding) leave independent zero-mean
    error; feeding it back would double its variance each round without removing any bias.
    """
    return rule.topk < 1.0 or not stochastic


def view_hash(state: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) naming an adapter state: what a downlink step applies to."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + b"\0" + np.ascontiguousarray(state[k], dtype=np.float32).tobytes())
    return h.hexdigest()


def _shapes(state: dict[str, np.ndarray]):
    return expected_manifest({k: v.shape for k, v in state.items()})


class DownlinkTracker:
    """Coordinator side: what each node holds, and the payload that brings it to the new global."""

    def __init__(self, ts: TransportSettings) -> None:
        self.ts = ts
        self.views: dict[int, dict[str, np.ndarray]] = {}
        # hash of the global adapter each node's last payload was computed from: when it has not
        # changed since (the train message right after an evaluate message), only an empty step is
        # sent; what lossy coding left out of the view stays in ``global - view`` for the next change
        self.sent_for: dict[int, str] = {}
        # Sites normally hold the same adapter, so one round's payloads repeat: encode once per
        # distinct base. Key: (hash of the new global, seed, hash of the base or NO_BASE, unchanged).
        self._memo: dict[tuple[str, int | None, str, bool], tuple[bytes, dict[str, np.ndarray]]] = {}
        self.encodes = 0  # how many payloads were actually encoded (the memo's effect is tested)

    def payload_for(self, node: int, state: dict[str, np.ndarray], seed: int | None = None) -> tuple[bytes, str]:
        """The payload that brings ``node`` to ``state``, and the hash of the base it applies to."""
        base = self.views.get(node)
        base_id = NO_BASE if base is None else view_hash(base)
        global_id = view_hash(state)
        unchanged = base is not None and self.sent_for.get(node) == global_id
        key = (global_id, seed, base_id, unchanged)
        if key not in self._memo:
            if not any(k[:2] == key[:2] for k in self._memo):
                self._memo.clear()  # a new global adapter: earlier payloads are stale
            self._memo[key] = self._encode(state, base, seed, unchanged)
        payload, view = self._memo[key]
        self.views[node] = view
        self.sent_for[node] = global_id
        return payload, base_id

    def _encode(self, state: dict[str, np.ndarray], base: dict[str, np.ndarray] | None,
                seed: int | None, unchanged: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
        # encode returns what the receiver will reconstruct (bit for bit, tested): no decode after encode
        self.encodes += 1
        if base is None:
            payload, view = encode(state, downlink_policy(self.ts, keyframe=True), seed=seed)
            return payload, {k: np.asarray(v, dtype=np.float32) for k, v in view.items()}
        if unchanged:  # an empty step: the site keeps exactly what it holds
            payload, _ = encode({k: np.zeros_like(state[k]) for k in state}, downlink_policy(self.ts, False), seed=seed)
            return payload, base
        diff = {k: state[k] - base[k] for k in state}
        payload, step = encode(diff, downlink_policy(self.ts, keyframe=False), seed=seed)
        return payload, {k: (base[k] + step[k]).astype(np.float32) for k in state}

    def forget(self, node: int) -> None:
        """Forget what ``node`` holds: it gets a full adapter next time."""
        self.views.pop(node, None)
        self.sent_for.pop(node, None)


def site_receive(payload: bytes, base_id: str, held: dict[str, np.ndarray] | None,
                 template: dict[str, np.ndarray], ts: TransportSettings) -> dict[str, np.ndarray]:
    """Site side: rebuild the global adapter from the payload and the adapter the site already holds."""
    expected = _shapes(template)
    if base_id == NO_BASE:
        return decode(payload, expected, max_bytes=ts.max_update_bytes)
    if held is None or view_hash(held) != base_id:
        raise FedSecureError(f"this site does not hold the adapter the coordinator's update applies to "
                             f"{RESEND_FULL}")
    step = decode(payload, expected, max_bytes=ts.max_update_bytes)
    return {k: (held[k] + step[k]).astype(np.float32) for k in held}


def fed_back(ts: TransportSettings, names) -> set[str]:
    """The uplink tensors that keep an error-feedback residual (none: no residual is stored at all)."""
    if not ts.error_feedback:
        return set()
    policy = uplink_policy(ts)
    return {k for k in names if carries_error(policy.rule(k), policy.stochastic)}


def site_encode(delta: dict[str, np.ndarray], residual: dict[str, np.ndarray] | None, ts: TransportSettings,
                seed: int | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """Encode delta (+ residual when error feedback is on); returns (payload, new residual).

    The rounding randomness need not be secret: it acts on an already DP-noised update
    (post-processing), so a seed derived from the run seed keeps runs reproducible.
    """
    policy = uplink_policy(ts)
    fed = fed_back(ts, delta)
    target = {k: (delta[k] + residual[k]) if (residual and k in fed) else delta[k] for k in delta}
    payload, decoded = encode(target, policy, seed=seed)
    return payload, {k: (target[k] - decoded[k]).astype(np.float32) if k in fed else np.zeros_like(target[k])
                     for k in target}
