"""Human-readable fields of a piece of evidence (``fedsecure attest inspect``); parses, verifies nothing."""

from __future__ import annotations

from typing import Any

from fedsecure.attestation.base import describer_for
from fedsecure.attestation.evidence import Evidence


def describe(ev: Evidence) -> dict[str, Any]:
    """The evidence's TEE type, provider and size, the fields its TEE module describes, and its aux blob names."""
    out: dict[str, Any] = {"tee": ev.tee, "provider": ev.provider or "-", "size": len(ev.blob)}
    describer = describer_for(ev.tee)
    if describer is not None:
        out.update(describer(ev))
    out["aux"] = sorted(ev.aux)
    return out
