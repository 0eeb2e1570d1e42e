"""Human-readable fields of a piece of evidence (``fedsecure attest inspect``); parses, verifies nothing."""

from __future__ import annotations

import json
from typing import Any

from cryptography import x509

from fedsecure.attestation import sevsnp, tdx
from fedsecure.attestation.evidence import Evidence
from fedsecure.errors import AttestationError


def _certs(pem: bytes) -> list[dict[str, str]]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []
    return [{"subject": c.subject.rfc4514_string(), "not_before": c.not_valid_before_utc.isoformat(),
             "not_after": c.not_valid_after_utc.isoformat()} for c in certs]


def describe(ev: Evidence) -> dict[str, Any]:
    out: dict[str, Any] = {"tee": ev.tee, "provider": ev.provider or "-", "size": len(ev.blob)}
    if ev.tee == "tdx":
        q = tdx.parse_quote(ev.blob)
        out.update(version=q.version, mrtd=q.mrtd.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(q.rtmrs)},
                   mrconfigid=q.field(184, 48).hex(), mrowner=q.field(232, 48).hex(),
                   mrownerconfig=q.field(280, 48).hex(), td_attributes=q.field(120, 8).hex(),
                   xfam=q.field(128, 8).hex(), report_data=q.report_data.hex(), pck_chain=_certs(q.pck_chain_pem))
    elif ev.tee == "sev-snp":
        r = sevsnp.parse_report(ev.blob)
        out.update(version=r.version, guest_svn=r.guest_svn, policy=hex(r.policy), vmpl=r.vmpl,
                   measurement=r.measurement.hex(), host_data=r.host_data.hex(), report_data=r.report_data.hex(),
                   chip_id=r.chip_id.hex(), reported_tcb=r.reported_tcb)
    elif ev.tee == "software":
        try:
            doc = json.loads(ev.blob)
        except ValueError:
            raise AttestationError("software evidence is not a JSON statement") from None
        out.update({k: v for k, v in doc.items() if k != "fedsecure-software-evidence"})
        out["warning"] = "software evidence: simulation only"
    elif ev.tee == "nvidia-gpu":
        out["evidence_items"] = len(json.loads(ev.blob)) if ev.blob.strip().startswith(b"[") else "?"
    out["aux"] = sorted(ev.aux)
    return out
