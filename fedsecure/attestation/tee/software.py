"""The ``software`` TEE: an Ed25519-signed statement, for development and simulation only.

Site (provider ``software``): signs ``{report_data, measurement = code hash, issued_at}`` with a key kept
in the site's state directory. Coordinator: checks the signature, the report data, the measurement
allow-list and the statement's age. It proves nothing about the platform (a site can generate any key
and sign anything), so both halves warn (:class:`SoftwareAttestationWarning`) on every use.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedsecure.attestation.base import (
    SOFTWARE_WARNING,
    Claims,
    ProviderSettings,
    SoftwareAttestationWarning,
    TeeInfo,
    VerifyRequest,
    check_report_data,
    register_provider,
    register_tee,
    register_verifier,
)
from fedsecure.attestation.evidence import Evidence, code_hash
from fedsecure.attestation.keys import load_or_create_ed25519, raw_public
from fedsecure.errors import AttestationError

__all__ = ["CLOCK_SKEW_S", "SOFTWARE_WARNING", "SoftwareAttestationWarning", "SoftwareProvider", "describe",
           "verify_evidence"]

log = logging.getLogger(__name__)

#: how far in the future a software statement's time may lie (clock skew)
CLOCK_SKEW_S = 60.0


# ---------------------------------------------------------------------------- site
_LOGGED: set[str] = set()  # node keys whose software evidence was logged in this process


class SoftwareProvider:
    """Signs ``{report_data, measurement = code hash, issued_at}`` with a local Ed25519 key."""

    name = "software"

    def __init__(self, key_path: str | Path, measurement: str | None = None) -> None:
        self.key = load_or_create_ed25519(Path(key_path))
        self.measurement = measurement or code_hash()
        self.key_path = str(key_path)

    def evidence(self, report_data: bytes) -> Evidence:
        """A signed statement over ``report_data``; warns that it proves nothing."""
        check_report_data(report_data)
        warnings.warn(SOFTWARE_WARNING, SoftwareAttestationWarning, stacklevel=2)
        if self.key_path not in _LOGGED:  # logged once per site and process; each statement is a warning above
            _LOGGED.add(self.key_path)
            log.warning("%s", SOFTWARE_WARNING)
        statement = json.dumps({"fedsecure-software-evidence": 1, "public_key": raw_public(self.key).hex(),
                                "report_data": report_data.hex(), "measurement": self.measurement,
                                "issued_at": _dt.datetime.now(_dt.UTC).isoformat()},
                               sort_keys=True, separators=(",", ":")).encode()
        return Evidence("software", statement, "software", {"signature": self.key.sign(statement)})


def _provider(settings: ProviderSettings) -> SoftwareProvider:
    return SoftwareProvider(settings.state_dir / "attestation" / "software-signer.pem")


# ---------------------------------------------------------------------------- coordinator
def verify_evidence(evidence: Evidence, request: VerifyRequest) -> Claims:
    """Check a software statement: signature, report data, measurement allow-list and age; warns on every use."""
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
    expected, allowed = request.expected_report_data, request.allowed_measurements
    if expected is not None and rd != expected:
        raise AttestationError("REPORT_DATA does not match the challenge (stale, replayed or unbound evidence)")
    if allowed is not None and measurement not in allowed:
        raise AttestationError(f"measurement {measurement[:16]}... is not in the policy's allow-list")
    age = (request.at - issued).total_seconds()
    if age < -CLOCK_SKEW_S:
        raise AttestationError(f"software evidence is dated {-age:.0f} s in the future (clock skew?)")
    max_age_s = request.max_evidence_age_s
    if max_age_s is not None and age > max_age_s:
        raise AttestationError(f"evidence is {age:.0f} s old, older than the policy's max_evidence_age_s="
                               f"{max_age_s:g}")
    return Claims("software", measurement, rd.hex(), evidence.provider,
                  {"signer": key.hex(), "issued_at": issued.isoformat()})


def describe(evidence: Evidence) -> dict[str, Any]:
    """The statement's fields (``fedsecure attest inspect``), with a reminder that it proves nothing."""
    try:
        doc = json.loads(evidence.blob)
    except ValueError:
        raise AttestationError("software evidence is not a JSON statement") from None
    out = {k: v for k, v in doc.items() if k != "fedsecure-software-evidence"}
    out["warning"] = "software evidence: simulation only"
    return out


def register() -> None:
    """Register the ``software`` TEE (facts, verifier, describer) and the ``software`` provider."""
    register_tee(TeeInfo("software", "Ed25519-signed statement (simulation only; proves nothing about the platform)",
                         measurement_hex=64, simulation_only=True))
    register_verifier("software", verify_evidence, describe=describe)
    register_provider("software", _provider)
