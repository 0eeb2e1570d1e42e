"""The coordinator's verifier interface: ``verify(evidence, expected_report_data, policy, at_time) -> Claims``.

Applies the policy (is this TEE type accepted, and with which launch measurements) and dispatches on the
evidence's TEE type to the verifier its module registered (:func:`~fedsecure.attestation.base.verifier_for`:
TDX quotes, SEV-SNP reports, software statements, NVIDIA's attestation SDK). Any failure is one
:class:`~fedsecure.errors.AttestationError` with the reason.

Without a policy (``fedsecure attest verify FILE``), only signatures, certificate chains and (if
given) the report data are checked.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

# Claims and SoftwareAttestationWarning are re-exported: callers import them from here, and warning filters
# name fedsecure.attestation.verify.SoftwareAttestationWarning.
from fedsecure.attestation.base import (
    SOFTWARE_WARNING,
    Claims,
    SoftwareAttestationWarning,
    VerifyRequest,
    verifier_for,
)
from fedsecure.attestation.evidence import Evidence
from fedsecure.attestation.policy import Policy
from fedsecure.errors import AttestationError

__all__ = ["SOFTWARE_WARNING", "Claims", "SoftwareAttestationWarning", "verify"]


def _allowed(policy: Policy | None, tee: str) -> tuple[str, ...] | None:
    if policy is None:
        return None
    if not policy.allows(tee):
        raise AttestationError(f"the policy accepts no {tee} evidence (allowed: {', '.join(policy.measurements)})")
    return policy.measurements[tee]


def verify(evidence: Evidence, expected_report_data: bytes | None = None, policy: Policy | None = None,
           at_time: _dt.datetime | None = None, *, vcek_dir: str | Path | None = None) -> Claims:
    """Verify ``evidence``; returns its claims or raises AttestationError naming the first failure.

    Args:
        evidence: the evidence, as parsed from its envelope (or detected from raw bytes).
        expected_report_data: the 64 bytes it must carry (the challenge binding), or None to skip that check.
        policy: the coordinator's policy (TEE types and measurements accepted, evidence age), or None.
        at_time: the verification time (default now); certificates must be valid at it.
        vcek_dir: SEV-SNP: overrides the policy's VCEK cache directory.

    Returns:
        The evidence's claims.

    Raises:
        AttestationError: the policy refuses the TEE type, the TEE type is unknown, or a check fails.
    """
    at = at_time or _dt.datetime.now(_dt.UTC)
    allowed = _allowed(policy, evidence.tee)
    request = VerifyRequest(at=at, expected_report_data=expected_report_data, allowed_measurements=allowed,
                            max_evidence_age_s=policy.max_evidence_age_s if policy else None,
                            vcek_dir=vcek_dir or (policy.vcek_dir if policy else None))
    return verifier_for(evidence.tee)(evidence, request)
