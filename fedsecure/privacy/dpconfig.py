"""The DP configuration a site attests to for one round: one typed document for the site, the attestation
protocol and the coordinator (instead of a dict whose keys each matched on its own).

On the wire it is canonical JSON of the fields that are set (:func:`fedsecure._durable.canonical_json`);
its SHA-256 is bound into the TEE evidence. :meth:`DPConfig.from_json` is strict: a JSON object, known
fields only, each of the right type.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from fedsecure._durable import canonical_json

_NUMBERS = ("epsilon_budget", "delta", "sigma", "q", "max_grad_norm", "epsilon_spent")
_INTEGERS = ("steps", "records")
_STRINGS = ("accountant", "grad_sample_mode", "noise")


class DPConfigError(ValueError):
    """An attested DP configuration that is not a valid document."""


@dataclass(frozen=True)
class DPConfig:
    """The DP settings of one round (None: not part of this round's document, e.g. a non-private round)."""

    enabled: bool
    records: int | None = None  # training records N: the FedAvg weight, and q = batch / N
    epsilon_budget: float | None = None
    delta: float | None = None
    sigma: float | None = None
    q: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    epsilon_spent: float | None = None  # epsilon of the dataset after this round
    grad_sample_mode: str | None = None
    noise: str | None = None  # where the noise came from: "os-csprng" or "seeded" (simulation only)

    def to_json(self) -> str:
        """Canonical JSON of the fields that are set (what the evidence binds)."""
        doc = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return canonical_json(doc).decode()

    def number(self, name: str) -> float | None:
        """A numeric field by name (None when absent)."""
        value = getattr(self, name)
        return None if value is None else float(value)

    @classmethod
    def from_json(cls, text: str) -> DPConfig:
        """Parse strictly; raises DPConfigError naming what is wrong."""
        try:
            doc = json.loads(text)
        except ValueError:
            raise DPConfigError("the attested DP configuration is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("enabled"), bool):
            raise DPConfigError("the attested DP configuration is not a JSON object with 'enabled'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise DPConfigError(f"the attested DP configuration has unknown fields {', '.join(unknown)[:200]}")
        for key, value in doc.items():
            if key == "enabled":
                continue
            ok = (key in _NUMBERS and _is_number(value)) or (key in _INTEGERS and _is_int(value)) or \
                 (key in _STRINGS and isinstance(value, str) and len(value) <= 64)
            if not ok:
                raise DPConfigError(f"the attested DP configuration's {key} is not valid ({value!r:.40})")
        return cls(**doc)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0
