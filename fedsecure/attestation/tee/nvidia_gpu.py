"""The ``nvidia-gpu`` TEE: GPU confidential-computing evidence through NVIDIA's attestation SDK.

Site (provider ``nvidia-gpu``): the SDK's evidence list, with nonce = SHA-256 of the report data.
Coordinator: the SDK's local verifier, against the nonce computed from the expected report data. The
SDK is imported only when used, so neither side needs it installed until a GPU is attested; without it
both say so clearly. The policy pins no measurement for this TEE (the SDK checks the GPU's own claims).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedsecure.attestation.base import (
    Claims,
    ProviderSettings,
    TeeInfo,
    VerifyRequest,
    check_report_data,
    register_provider,
    register_tee,
    register_verifier,
)
from fedsecure.attestation.evidence import Evidence
from fedsecure.errors import AttestationError


def gpu_nonce(report_data: bytes) -> str:
    """NVIDIA GPU evidence takes a 32-byte nonce: SHA-256 of the report data, as hex."""
    return hashlib.sha256(report_data).hexdigest()


def nvidia_sdk() -> Any:
    """NVIDIA's ``nv_attestation_sdk.attestation`` module; raises AttestationError when it is not installed."""
    try:
        from nv_attestation_sdk import attestation
    except ImportError:
        raise AttestationError("NVIDIA GPU attestation needs NVIDIA's attestation SDK, which is not installed. "
                               "Fix: `pip install nv-attestation-sdk` inside the confidential VM (with the GPU "
                               "driver in CC mode), or choose another attestation provider") from None
    return attestation


# ---------------------------------------------------------------------------- site
class NvidiaGpuProvider:
    """GPU confidential-computing evidence from NVIDIA's attestation SDK (nonce = SHA-256 of the report data)."""

    name = "nvidia-gpu"

    def evidence(self, report_data: bytes) -> Evidence:
        """The SDK's GPU evidence list for ``report_data``, as JSON."""
        check_report_data(report_data)
        attestation = nvidia_sdk()
        client = attestation.Attestation()
        client.set_nonce(gpu_nonce(report_data))
        client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
        return Evidence("nvidia-gpu", json.dumps(client.get_evidence()).encode(), "nvidia-sdk")


def _provider(settings: ProviderSettings) -> NvidiaGpuProvider:
    return NvidiaGpuProvider()


# ---------------------------------------------------------------------------- coordinator
def verify_evidence(evidence: Evidence, request: VerifyRequest) -> Claims:
    """Have NVIDIA's SDK (local verifier) check the GPU evidence against the expected report data."""
    attestation = nvidia_sdk()
    expected = request.expected_report_data
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


def describe(evidence: Evidence) -> dict[str, Any]:
    """How many items the evidence list holds (``fedsecure attest inspect``)."""
    return {"evidence_items": len(json.loads(evidence.blob)) if evidence.blob.strip().startswith(b"[") else "?"}


def register() -> None:
    """Register the ``nvidia-gpu`` TEE (facts, verifier, describer) and its provider."""
    register_tee(TeeInfo("nvidia-gpu", "NVIDIA GPU confidential-computing evidence, checked by NVIDIA's SDK"))
    register_verifier("nvidia-gpu", verify_evidence, describe=describe)
    register_provider("nvidia-gpu", _provider)
