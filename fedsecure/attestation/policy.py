"""The coordinator's attestation policy (a YAML file, parsed strictly).

Example (``configs/attestation-policy.example.yaml``)::

    version: 1
    measurements:              # TEE types accepted, each with its allowed launch measurements
      tdx: ["<MRTD hex, 96 chars>"]
      sev-snp: ["<MEASUREMENT hex, 96 chars>"]
      # software: ["<code hash>"]   development only: proves nothing about the platform
    code: ["<fedsecure code hash>"]   # builds accepted (`fedsecure attest code-hash`)
    min_dp:                    # the weakest privacy settings a site may attest to
      epsilon_budget: 3.0      # the largest budget a site may attest to
      delta: 1.0e-5            # the largest delta
      min_sigma: 0.5
      secure_noise: true       # noise from the OS's secure generator, never a seed (default true)
    max_evidence_age_s: 3600   # from the nonce (sent with the train message) to the verified reply
    on_failure: reject-update  # or retire-site
    vcek_dir: /etc/fedsecure/vcek   # SEV-SNP VCEK cache: <chip_id hex>.der and cert_chain.pem

A TEE type absent from ``measurements`` is refused; so is a site whose evidence is missing. The TEE
types, and the hex length of each one's measurement, are those registered by the TEE modules
(:func:`fedsecure.attestation.base.registered_tees`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsecure.attestation.base import tee_info, tee_names
from fedsecure.errors import ConfigError

ON_FAILURE = ("reject-update", "retire-site")


@dataclass(frozen=True)
class MinDP:
    """The weakest privacy settings a site may attest to (None: no bound)."""

    epsilon_budget: float | None = None  # the largest budget a site may attest to
    delta: float | None = None  # the largest delta
    min_sigma: float | None = None
    secure_noise: bool = True  # the attested noise source must be the OS's secure generator


@dataclass(frozen=True)
class Policy:
    """The coordinator's attestation policy: accepted TEE types and measurements, builds, DP floor, actions."""

    measurements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    min_dp: MinDP | None = None
    max_evidence_age_s: float = 3600.0
    on_failure: str = "reject-update"
    vcek_dir: str | None = None
    source: str = "<memory>"

    def allows(self, tee: str) -> bool:
        """Whether evidence of TEE type ``tee`` is accepted at all."""
        return tee in self.measurements

    def to_dict(self) -> dict[str, Any]:
        """The policy as the mapping a policy file holds."""
        out: dict[str, Any] = {"version": 1, "measurements": {k: list(v) for k, v in self.measurements.items()},
                               "code": list(self.code), "max_evidence_age_s": self.max_evidence_age_s,
                               "on_failure": self.on_failure}
        if self.min_dp is not None:
            out["min_dp"] = {k: v for k, v in vars(self.min_dp).items() if v is not None}
        if self.vcek_dir:
            out["vcek_dir"] = self.vcek_dir
        return out

    def to_yaml(self) -> str:
        """The policy as policy-file YAML (``load_policy`` reads it back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _fail(source: str, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}. Fix: {fix}.")


def _hexlist(value: Any, source: str, key: str, length: int | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, key, f"must be a list of hex strings, got {value!r}",
                    "write e.g. [\"ab12...\"]; quote each value, since YAML reads bare digits as a number")
    out = []
    for v in value:
        v = v.strip().lower()
        try:
            bytes.fromhex(v)
        except ValueError:
            raise _fail(source, key, f"{v[:20]!r} is not hex", "paste the value printed by `fedsecure attest "
                        "inspect`") from None
        if length is not None and len(v) != length:
            raise _fail(source, key, f"{v[:20]}... has {len(v)} hex digits, {length} expected",
                        "paste the whole value printed by `fedsecure attest inspect`")
        out.append(v)
    return tuple(out)


def policy_from_mapping(doc: Any, source: str = "<memory>", base: Path | None = None) -> Policy:
    """Validate a parsed policy document; raises ConfigError naming the key, the problem and the fix.

    Args:
        doc: the parsed document (a mapping).
        source: where it came from, for error messages.
        base: the directory a relative ``vcek_dir`` is resolved against (the policy file's).
    """
    if not isinstance(doc, dict):
        raise _fail(source, "(top level)", "must be a mapping", "see configs/attestation-policy.example.yaml")
    known = {"version", "measurements", "code", "min_dp", "max_evidence_age_s", "on_failure", "vcek_dir"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _fail(source, unknown[0], "unknown key", f"use only {', '.join(sorted(known))}")
    if doc.get("version", 1) != 1:
        raise _fail(source, "version", f"{doc.get('version')!r} is not supported", "set version: 1")
    meas = doc.get("measurements")
    if not isinstance(meas, dict) or not meas:
        raise _fail(source, "measurements", "must map at least one TEE type to its allowed measurements",
                    f"list allowed measurements under one of {', '.join(tee_names())}")
    measurements = {}
    for tee, values in meas.items():
        info = tee_info(tee) if isinstance(tee, str) else None
        if info is None:
            raise _fail(source, f"measurements.{tee}", "unknown TEE type", f"use one of {', '.join(tee_names())}")
        measurements[tee] = _hexlist(values, source, f"measurements.{tee}", info.measurement_hex)
        if info.measurement_hex is not None and not measurements[tee]:
            raise _fail(source, f"measurements.{tee}", "is empty, so no evidence of this type could pass",
                        "list the allowed measurements, or remove the TEE type")
    code = _hexlist(doc.get("code", []), source, "code", 64)
    if not code:
        raise _fail(source, "code", "must list at least one accepted code hash",
                    "add the value printed by `fedsecure attest code-hash` on the approved build")
    min_dp = None
    if doc.get("min_dp") is not None:
        md = doc["min_dp"]
        if not isinstance(md, dict) or set(md) - {"epsilon_budget", "delta", "min_sigma", "secure_noise"}:
            raise _fail(source, "min_dp", f"must hold only epsilon_budget, delta, min_sigma, secure_noise, got "
                        f"{md!r}", "e.g. {epsilon_budget: 3.0, delta: 1.0e-5, min_sigma: 0.5, secure_noise: true}")
        secure = md.get("secure_noise", True)
        if not isinstance(secure, bool):
            raise _fail(source, "min_dp.secure_noise", f"{secure!r} is not true or false", "write true or false")
        numbers = {k: v for k, v in md.items() if k != "secure_noise"}
        for k, v in numbers.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise _fail(source, f"min_dp.{k}", f"{v!r} is not a positive number", "write a positive number")
        min_dp = MinDP(**{k: float(v) for k, v in numbers.items()}, secure_noise=secure)
    age = doc.get("max_evidence_age_s", 3600)
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 < age <= 86400:
        raise _fail(source, "max_evidence_age_s", f"{age!r} is out of range", "use seconds in (0, 86400]")
    on_failure = doc.get("on_failure", "reject-update")
    if on_failure not in ON_FAILURE:
        raise _fail(source, "on_failure", f"{on_failure!r} is not an action", f"use one of {', '.join(ON_FAILURE)}")
    vcek_dir = doc.get("vcek_dir")
    if vcek_dir is not None:
        if not isinstance(vcek_dir, str):
            raise _fail(source, "vcek_dir", "must be a path", "write a directory path")
        p = Path(vcek_dir)
        vcek_dir = str(p if p.is_absolute() or base is None else base / p)
    return Policy(measurements=measurements, code=code, min_dp=min_dp, max_evidence_age_s=float(age),
                  on_failure=on_failure, vcek_dir=vcek_dir, source=source)


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``; raises ConfigError naming what is wrong and the fix."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"attestation policy {p}: cannot read it ({e.strerror}). Fix: point "
                          "attestation.policy at the consortium's policy file.") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"attestation policy {p}: not valid YAML ({e}). Fix: correct the file.") from None
    return policy_from_mapping(doc, str(p), p.parent)
