"""The attestation round protocol (no Flower types here; ``federation/`` carries the fields).

Coordinator -> site (train message): a fresh 32-byte nonce, issued to that node for that round.

Site -> coordinator (train reply), :func:`site_statement`:

- ``nonce``: echoed; ``node-key``: the site's Ed25519 public key (kept in its state directory);
- ``dp-config``: the DP settings of this round as canonical JSON (budget, delta, sigma, q, steps, C, ...);
- ``code-hash``: :func:`~fedsecure.attestation.evidence.code_hash`;
- ``evidence``: the provider's evidence over ``report_data(nonce, node-key, dp-config, code-hash)``;
- ``update-signature``: the node key's Ed25519 signature of (nonce, digest of the update it sends).

The coordinator (:class:`AttestationGate`) accepts each nonce once, from the node it was issued to,
within ``max_evidence_age_s``; verifies the evidence against the report data it computes itself and
the policy (TEE type, measurement); checks the code hash and the DP configuration against the policy
and against the privacy numbers the site reports; and checks that the update is signed by the attested
node key. Every decision goes to the audit log. NVIDIA FLARE's authorizers, for contrast, let the
attester choose the nonce, compare no SNP measurement and skip keys; see ``shared/notes/peers.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsecure.attestation.base import Claims, Provider
from fedsecure.attestation.evidence import Evidence, code_hash, report_data, update_message
from fedsecure.attestation.keys import raw_public
from fedsecure.attestation.policy import Policy
from fedsecure.attestation.verify import verify
from fedsecure.audit import AuditLog
from fedsecure.errors import AttestationError
from fedsecure.privacy.dpconfig import DPConfig, DPConfigError

log = logging.getLogger(__name__)

NONCE_BYTES = 32
#: DP-config fields a reply's numbers are checked against
DP_NUMBERS = ("records", "epsilon_budget", "delta", "sigma", "q", "steps", "max_grad_norm", "epsilon_spent")
FIELDS = ("nonce", "node-key", "dp-config", "code-hash", "evidence", "update-signature")
MAX_DP_CONFIG = 4096


def update_digest_payload(payload: bytes) -> bytes:
    """Digest of an update sent as one opaque payload (e.g. a sealed blob)."""
    return hashlib.sha256(b"payload\0" + payload).digest()


#: What a statement signs in place of the update when it travels by secure aggregation (masked, in later messages
#: that the node key signs itself): the coordinator never sees the update to hash it.
SECAGG_UPDATE_DIGEST = hashlib.sha256(b"secagg\0the update travels masked, signed per phase by the node key").digest()


def update_digest_state(state: Mapping[str, np.ndarray]) -> bytes:
    """Digest of an adapter delta sent as plain arrays (float32, name-sorted, with shapes)."""
    h = hashlib.sha256(b"arrays\0")
    for name in sorted(state):
        a = np.ascontiguousarray(state[name], dtype=np.float32)
        h.update(f"{name}:{a.shape}\0".encode() + a.tobytes())
    return h.digest()


def dp_config_document(*, enabled: bool, **settings: Any) -> str:
    """The DP configuration a site attests to, as canonical JSON (:class:`~fedsecure.privacy.dpconfig.DPConfig`)."""
    return DPConfig(enabled=enabled, **settings).to_json()


def site_statement(provider: Provider, node_key: Ed25519PrivateKey, nonce: bytes, dp_config: str,
                   update_digest: bytes) -> dict[str, bytes | str]:
    """Everything a site adds to its train reply (see the module docstring)."""
    ch = code_hash()
    pub = raw_public(node_key)
    evidence = provider.evidence(report_data(nonce, pub, dp_config, ch))
    return {"nonce": nonce, "node-key": pub, "dp-config": dp_config, "code-hash": ch,
            "evidence": evidence.to_bytes(), "update-signature": node_key.sign(update_message(nonce, update_digest))}


@dataclass(frozen=True)
class _Issued:
    node: int
    site: str
    server_round: int
    monotonic: float


class AttestationGate:
    """Coordinator side: issues nonces, checks statements against the policy, audits every decision."""

    def __init__(self, policy: Policy, audit: AuditLog, *, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.UTC)) -> None:
        self.policy, self.audit, self.clock, self.now = policy, audit, clock, now
        self.issued: dict[bytes, _Issued] = {}
        self.used: set[bytes] = set()
        self.owners: dict[bytes, _Issued] = {}  # every nonce issued in this run (32 bytes per site and round)
        self.node_keys: dict[str, str] = {}  # site -> node key (hex) first accepted in this run
        audit.append("attestation.policy", source=policy.source, policy=policy.to_dict())

    # ------------------------------------------------------------------ nonces
    def challenge(self, node: int, site: str, server_round: int) -> bytes:
        """A fresh nonce for ``node`` (``site``) in ``server_round``; audited by its digest."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        self.issued[nonce] = self.owners[nonce] = _Issued(node, site, server_round, self.clock())
        self.audit.append("attestation.nonce-issued", node=node, site=site, round=server_round,
                          nonce_sha256=hashlib.sha256(nonce).hexdigest())
        return nonce

    def close_round(self, server_round: int) -> None:
        """Expire the nonces of ``server_round`` that no reply used."""
        for nonce, iss in list(self.issued.items()):
            if iss.server_round <= server_round:
                del self.issued[nonce]
                self.used.add(nonce)
                self.audit.append("attestation.nonce-expired", node=iss.node, site=iss.site, round=iss.server_round,
                                  nonce_sha256=hashlib.sha256(nonce).hexdigest())

    def _take_nonce(self, nonce: bytes, node: int, server_round: int) -> _Issued:
        iss = self.owners.get(nonce)
        if iss is None:
            raise AttestationError("the nonce was not issued by this coordinator")
        if iss.node != node:
            raise AttestationError(f"the nonce was issued to another site ({iss.site}): evidence taken from "
                                   "another site")
        if nonce in self.used:
            raise AttestationError("the nonce was already used: replayed evidence")
        if iss.server_round != server_round:
            raise AttestationError(f"the nonce belongs to round {iss.server_round}, not {server_round}")
        del self.issued[nonce]
        self.used.add(nonce)
        return iss

    # ------------------------------------------------------------------ checks
    def check(self, node: int, site: str, server_round: int, statement: Mapping[str, Any] | None,
              update_digest: bytes, reported: Mapping[str, float] | None = None) -> Claims:
        """Accept or reject one site's statement for ``server_round``; raises AttestationError with the reason."""
        try:
            claims = self._check(node, site, server_round, statement, update_digest, reported or {})
        except AttestationError as e:
            self.audit.append("attestation.rejected", node=node, site=site, round=server_round, reason=str(e),
                              action=self.policy.on_failure)
            raise
        self.audit.append("attestation.accepted", node=node, site=site, round=server_round, tee=claims.tee,
                          provider=claims.provider, measurement=claims.measurement,
                          code_hash=str(statement["code-hash"]) if statement else "",
                          dp_config_sha256=hashlib.sha256(str(statement["dp-config"]).encode()).hexdigest()
                          if statement else "", node_key=self.node_keys.get(site, ""))
        return claims

    def _check(self, node: int, site: str, server_round: int, st: Mapping[str, Any] | None,
               update_digest: bytes, reported: Mapping[str, float]) -> Claims:
        if st is None:
            raise AttestationError("the site sent no attestation evidence")
        missing = [f for f in FIELDS if f not in st]
        if missing:
            raise AttestationError(f"the attestation statement lacks {', '.join(missing)}")
        nonce, key, dp, ch, ev, sig = (st[f] for f in FIELDS)
        if not (isinstance(nonce, bytes) and isinstance(key, bytes) and isinstance(ev, bytes)
                and isinstance(sig, bytes) and isinstance(dp, str) and isinstance(ch, str)):
            raise AttestationError("the attestation statement's fields have the wrong types")
        if len(nonce) != NONCE_BYTES or len(key) != 32 or len(dp) > MAX_DP_CONFIG:
            raise AttestationError("the attestation statement's fields have the wrong sizes")
        try:
            bytes.fromhex(ch)
        except ValueError:
            raise AttestationError("the code hash is not hex") from None
        iss = self._take_nonce(nonce, node, server_round)
        age = self.clock() - iss.monotonic
        if age > self.policy.max_evidence_age_s:
            raise AttestationError(f"the evidence came {age:.0f} s after the nonce, over the policy's "
                                   f"max_evidence_age_s={self.policy.max_evidence_age_s:g}")
        known = self.node_keys.get(site)
        if known is not None and known != key.hex():
            raise AttestationError("the node key differs from the one this site attested with earlier in this run "
                                   "(evidence bound to another node key)")
        expected = report_data(nonce, key, dp, ch)
        claims = verify(Evidence.from_bytes(ev), expected, self.policy, self.now())
        if ch.lower() not in self.policy.code:
            raise AttestationError(f"code hash {ch[:16]}... is not an approved build (policy 'code')")
        self._check_dp(dp, reported)
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, update_message(nonce, update_digest))
        except InvalidSignature:
            raise AttestationError("the update is not signed by the attested node key (altered in transit, or "
                                   "evidence bound to another node key)") from None
        self.node_keys[site] = key.hex()
        return claims

    def _check_dp(self, dp: str, reported: Mapping[str, float]) -> None:
        try:
            cfg = DPConfig.from_json(dp)
        except DPConfigError as e:
            raise AttestationError(str(e)) from None
        self._check_min_dp(cfg)
        for key, value in reported.items():  # what the site reports (and the FedAvg weight) must be what it attested
            attested = cfg.number(key) if key in DP_NUMBERS else None
            if attested is None:
                raise AttestationError(f"the reply reports {key}={value:g} but the attested DP configuration has no "
                                       f"numeric {key}")
            if not math.isclose(attested, float(value), rel_tol=1e-9):
                raise AttestationError(f"reported {key}={value:g} differs from the attested "
                                       f"{key}={getattr(cfg, key)!r}")

    def _check_min_dp(self, cfg: DPConfig) -> None:
        m = self.policy.min_dp
        if m is None:
            return
        if not cfg.enabled:
            raise AttestationError("the attested DP configuration has differential privacy off; the policy "
                                   "requires it")
        checks = [("epsilon_budget", m.epsilon_budget, "min_dp.epsilon_budget", lambda v, b: v <= b),
                  ("delta", m.delta, "min_dp.delta", lambda v, b: v <= b),
                  ("sigma", m.min_sigma, "min_dp.min_sigma", lambda v, b: v >= b)]
        if m.secure_noise and cfg.noise != "os-csprng":
            raise AttestationError(f"the attested DP configuration draws its noise from {cfg.noise!r}, not "
                                   "the operating system's secure generator ('os-csprng'); the policy requires it "
                                   "(min_dp.secure_noise)")
        for key, bound, name, ok in checks:
            if bound is None:
                continue
            value = cfg.number(key)
            if value is None:
                raise AttestationError(f"the attested DP configuration lacks a numeric {key}")
            if not ok(value, bound):
                raise AttestationError(f"the attested DP configuration is weaker than the policy: {key}={value:g} "
                                       f"breaks {name}={bound:g}")
