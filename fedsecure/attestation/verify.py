"""The coordinator's verifier interface: ``verify(evidence, expected_report_data, policy, at_time) -> Claims``.

Dispatches on the evidence's TEE type to the TDX quote verifier, the SEV-SNP report verifier, the
software-statement verifier, or NVIDIA's attestation SDK, and applies the policy's measurement
allow-list. Any failure is one :class:`~fedsecure.errors.AttestationError` with the reason.

Without a policy (``fedsecure attest verify FILE``), only signatures, certificate chains and (if
given) the report data are checked.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedsecure.attestation import sevsnp, tdx
from fedsecure.attestation.evidence import Evidence
from fedsecure.attestation.policy import Policy
from fedsecure.errors import AttestationError

log = logging.getLogger(__name__)

SOFTWARE_WARNING = "software attestation evidence: simulation only, it proves nothing about the platform or code"
#: how far in the future a software statement's time may lie (clock skew)
CLOCK_SKEW_S = 60.0


class SoftwareAttestationWarning(UserWarning):
    """Raised (as a warning) on every use of the software provider or verifier."""


@dataclass(frozen=True)
class Claims:
    tee: str
    measurement: str
    report_data: str
    provider: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tee": self.tee, "measurement": self.measurement, "report_data": self.report_data,
                "provider": self.provider, **self.details}


def _allowed(policy: Policy | None, tee: str) -> tuple[str, ...] | None:
    if policy is None:
        return None
    if not policy.allows(tee):
        raise AttestationError(f"the policy accepts no {tee} evidence (allowed: {', '.join(policy.measurements)})")
    return policy.measurements[tee]


def verify(evidence: Evidence, expected_report_data: bytes | None = None, policy: Policy | None = None,
           at_time: _dt.datetime | None = None, *, vcek_dir: str | Path | None = None) -> Claims:
    """Verify ``evidence``; returns its claims or raises AttestationError naming the first failure.

    ``vcek_dir`` (SEV-SNP) overrides the policy's VCEK cache directory."""
    at = at_time or _dt.datetime.now(_dt.UTC)
    allowed = _allowed(policy, evidence.tee)
    if evidence.tee == "tdx":
        c = tdx.verify(evidence.blob, at_time=at, expected_report_data=expected_report_data, allowed_mrtd=allowed)
        return Claims("tdx", c.mrtd, c.report_data, evidence.provider,
                      {"version": c.version, "rtmrs": c.rtmrs, "mrconfigid": c.mrconfigid, "mrowner": c.mrowner,
                       "td_attributes": c.td_attributes, "root": c.root})
    if evidence.tee == "sev-snp":
        vcek, chain = _snp_certs(evidence, vcek_dir or (policy.vcek_dir if policy else None))
        s = sevsnp.verify(evidence.blob, vcek, chain, at_time=at, expected_report_data=expected_report_data,
                          allowed_measurements=allowed)
        return Claims("sev-snp", s.measurement, s.report_data, evidence.provider,
                      {"host_data": s.host_data, "chip_id": s.chip_id, "tcb": s.tcb, "policy": s.policy,
                       "vmpl": s.vmpl, "root": s.root})
    if evidence.tee == "software":
        return _verify_software(evidence, expected_report_data, allowed, at,
                                policy.max_evidence_age_s if policy else None)
    if evidence.tee == "nvidia-gpu":
        return _verify_nvidia(evidence, expected_report_data)
    raise AttestationError(f"unknown TEE type {evidence.tee!r}")


# ---------------------------------------------------------------------------- SEV-SNP certificates
def _snp_certs(evidence: Evidence, vcek_dir: str | Path | None) -> tuple[bytes, bytes]:
    """The VCEK and ASK/ARK chain: from the evidence's aux blobs (checked against the pinned root like any
    other), else from the policy's VCEK cache directory (<chip_id hex>.der, cert_chain.pem)."""
    vcek, chain = evidence.aux.get("vcek"), evidence.aux.get("cert_chain")
    if vcek is not None and chain is not None:
        return vcek, chain
    chip = sevsnp.parse_report(evidence.blob).chip_id.hex()
    if not vcek_dir:
        raise AttestationError(f"no VCEK for chip {chip[:16]}...: the evidence carries none and no vcek_dir is "
                               "configured. Fix: set vcek_dir in the policy to a cache holding <chip_id>.der and "
                               "cert_chain.pem (from AMD's key distribution service)")
    d = Path(vcek_dir)
    try:
        vcek = vcek if vcek is not None else (d / f"{chip}.der").read_bytes()
        chain = chain if chain is not None else (d / "cert_chain.pem").read_bytes()
    except OSError as e:
        raise AttestationError(f"VCEK cache {d}: {e.filename} is missing ({e.strerror}). Fix: fetch the VCEK for "
                               f"chip {chip[:16]}... and the ASK/ARK chain into the cache directory") from None
    return vcek, chain


# ---------------------------------------------------------------------------- software statements
def _verify_software(evidence: Evidence, expected: bytes | None, allowed: tuple[str, ...] | None,
                     at: _dt.datetime, max_age_s: float | None) -> Claims:
    warnings.warn(SOFTWARE_WARNING, SoftwareAttestationWarning, stacklevel=3)
    try:
        doc = json.loads(evidence.blob)
        key = bytes.fromhex(doc["public_key"])
        rd, measurement = bytes.fromhex(doc["report_data"]), str(doc["measurement"])
        issued = _dt.datetime.fromisoformat(doc["issued_at"])
        if doc.get("fedsecure-software-evidence") != 1 or len(key) != 32 or issued.tzinfo is None:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise AttestationError("software evidence is malformed (a JSON statement with public_key, report_data, "
                               "measurement and issued_at expected)") from None
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(evidence.aux.get("signature", b""), evidence.blob)
    except (InvalidSignature, ValueError):
        raise AttestationError("software evidence signature does not verify (statement altered)") from None
    if expected is not None and rd != expected:
        raise AttestationError("REPORT_DATA does not match the challenge (stale, replayed or unbound evidence)")
    if allowed is not None and measurement not in allowed:
        raise AttestationError(f"measurement {measurement[:16]}... is not in the policy's allow-list")
    age = (at - issued).total_seconds()
    if age < -CLOCK_SKEW_S:
        raise AttestationError(f"software evidence is dated {-age:.0f} s in the future (clock skew?)")
    if max_age_s is not None and age > max_age_s:
        raise AttestationError(f"evidence is {age:.0f} s old, older than the policy's max_evidence_age_s="
                               f"{max_age_s:g}")
    return Claims("software", measurement, rd.hex(), evidence.provider,
                  {"signer": key.hex(), "issued_at": issued.isoformat()})


# ---------------------------------------------------------------------------- NVIDIA GPU
def gpu_nonce(report_data: bytes) -> str:
    """NVIDIA GPU evidence takes a 32-byte nonce: SHA-256 of the report data, as hex."""
    return hashlib.sha256(report_data).hexdigest()


def nvidia_sdk():
    try:
        from nv_attestation_sdk import attestation  # type: ignore[import-not-found]
    except ImportError:
        raise AttestationError("NVIDIA GPU attestation needs NVIDIA's attestation SDK, which is not installed. "
                               "Fix: `pip install nv-attestation-sdk` inside the confidential VM (with the GPU "
                               "driver in CC mode), or choose another attestation provider") from None
    return attestation


def _verify_nvidia(evidence: Evidence, expected: bytes | None) -> Claims:
    attestation = nvidia_sdk()
    if expected is None:
        raise AttestationError("NVIDIA GPU evidence can only be checked against an expected nonce (--report-data)")
    try:
        evidence_list = json.loads(evidence.blob)
    except ValueError:
        raise AttestationError("NVIDIA GPU evidence is not the SDK's JSON evidence list") from None
    client = attestation.Attestation()
    client.set_nonce(gpu_nonce(expected))
    client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
    if not client.attest(evidence_list):
        raise AttestationError("NVIDIA's attestation SDK rejected the GPU evidence (see its log for the claim that "
                               "failed)")
    return Claims("nvidia-gpu", "sdk-verified", expected.hex(), evidence.provider, {"token": str(client.get_token())})
