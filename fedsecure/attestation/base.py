"""What the site side and the coordinator side of attestation share: protocols, claims and one registry.

Each module under :mod:`fedsecure.attestation.tee` registers, once (in its ``register()``), what it
contributes:

- :func:`register_tee`: a TEE's facts (:class:`TeeInfo`: name, launch-measurement length, how raw
  evidence of it is recognised). :mod:`~fedsecure.attestation.evidence` (envelopes, :func:`detect
  <fedsecure.attestation.evidence.detect>`) and :mod:`~fedsecure.attestation.policy` read them.
- :func:`register_verifier`: the coordinator's check of that TEE's evidence (and optionally its
  ``describe`` for ``fedsecure attest inspect``), used by :func:`~fedsecure.attestation.verify.verify`.
- :func:`register_provider`: a site's source of evidence, built by :func:`make_provider`.

The TEE modules are imported and registered, in a fixed order, on the first lookup
(:func:`fedsecure.attestation.tee.load`), so importing one of them never drags in the others, and a
provider module never imports a verifier module or the reverse: the two sides meet only here and in
:mod:`~fedsecure.attestation.evidence`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedsecure.errors import AttestationError

if TYPE_CHECKING:
    from fedsecure.attestation.evidence import Evidence

#: the text of every :class:`SoftwareAttestationWarning`
SOFTWARE_WARNING = ("software attestation evidence: for development only, it proves nothing about the platform "
                    "or the code a site runs")
REPORT_DATA_BYTES = 64


class SoftwareAttestationWarning(UserWarning):
    """Raised (as a warning) on every use of the software provider or verifier.

    Defined here, not in :mod:`fedsecure.attestation.tee.software`, because both sides raise it and
    callers filter it as ``fedsecure.attestation.verify.SoftwareAttestationWarning``.
    """


def check_report_data(report_data: bytes) -> None:
    """Raise AttestationError unless ``report_data`` has the 64 bytes a TEE signs."""
    if len(report_data) != REPORT_DATA_BYTES:
        raise AttestationError(f"report data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")


# ---------------------------------------------------------------------------- the shared types
@dataclass(frozen=True)
class TeeInfo:
    """The facts about one TEE type, registered once by its module.

    Attributes:
        name: the TEE type as it appears in evidence envelopes and the policy (``tdx``).
        description: one line for people (docs, error messages).
        measurement_hex: hex digits of the launch measurement the policy pins; None when the verifier
            pins none itself (the policy's list may then be empty and values have any length).
        simulation_only: evidence that proves nothing about the platform; listed after real TEEs.
        raw_format: how raw (envelope-less) evidence of this TEE is named, e.g. "a TDX quote (v4/v5)".
        recognize: tells raw evidence of this TEE by its header (for :func:`~fedsecure.attestation.evidence.detect`).
    """

    name: str
    description: str
    measurement_hex: int | None = None
    simulation_only: bool = False
    raw_format: str = ""
    recognize: Callable[[bytes], bool] | None = None


@dataclass(frozen=True)
class Claims:
    """What verified evidence says: TEE type, launch measurement, report data, and TEE-specific details."""

    tee: str
    measurement: str
    report_data: str
    provider: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The claims as one flat mapping (details merged in)."""
        return {"tee": self.tee, "measurement": self.measurement, "report_data": self.report_data,
                "provider": self.provider, **self.details}


@dataclass(frozen=True)
class VerifyRequest:
    """What the coordinator asks of a verifier, the policy already reduced to plain values.

    Attributes:
        at: the verification time (certificates are checked at it; test evidence is old).
        expected_report_data: the 64 bytes the evidence must carry, or None to skip that check.
        allowed_measurements: the policy's allow-list for this TEE, or None without a policy.
        max_evidence_age_s: the policy's bound on the evidence's age, or None without a policy.
        vcek_dir: SEV-SNP: the VCEK cache directory (``<chip_id hex>.der``, ``cert_chain.pem``).
    """

    at: _dt.datetime
    expected_report_data: bytes | None = None
    allowed_measurements: tuple[str, ...] | None = None
    max_evidence_age_s: float | None = None
    vcek_dir: str | Path | None = None


@dataclass(frozen=True)
class ProviderSettings:
    """A site's provider settings (its ``attestation`` config section and state directory)."""

    state_dir: Path
    command: tuple[str, ...] = ()
    configfs_root: Path | None = None


class Provider(Protocol):
    """A site's source of evidence: ``provider.evidence(report_data) -> Evidence``."""

    name: str

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence over the 64 ``report_data`` bytes; raises AttestationError naming what failed."""
        ...


class Verifier(Protocol):
    """The coordinator's check of one TEE type's evidence; raises AttestationError naming the first failure."""

    def __call__(self, evidence: Evidence, request: VerifyRequest) -> Claims:
        """Verify ``evidence`` as ``request`` asks; returns its claims."""
        ...


ProviderFactory = Callable[[ProviderSettings], Provider]
Describer = Callable[["Evidence"], dict[str, Any]]


# ---------------------------------------------------------------------------- the registry
@dataclass
class Registry:
    """TEE facts, verifiers, describers and provider factories, each keyed by name in registration order."""

    tees: dict[str, TeeInfo] = field(default_factory=dict)
    verifiers: dict[str, Verifier] = field(default_factory=dict)
    describers: dict[str, Describer] = field(default_factory=dict)
    providers: dict[str, ProviderFactory] = field(default_factory=dict)

    def copy(self) -> Registry:
        """An independent copy (tests register into one and throw it away)."""
        return Registry(dict(self.tees), dict(self.verifiers), dict(self.describers), dict(self.providers))


REGISTRY = Registry()
_loaded = False


def _ensure_loaded() -> None:
    """Have the TEE modules register themselves (once, on the first lookup)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from fedsecure.attestation import tee

        tee.load()
    except BaseException:
        _loaded = False
        raise


def _new(kind: str, name: str, table: Mapping[str, object]) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")


def register_tee(info: TeeInfo) -> TeeInfo:
    """Register a TEE's facts; each TEE type is registered exactly once."""
    _new("TEE", info.name, REGISTRY.tees)
    REGISTRY.tees[info.name] = info
    return info


def register_verifier(tee: str, verifier: Verifier, *, describe: Describer | None = None) -> None:
    """Register the coordinator's verifier (and optionally the ``inspect`` describer) for a registered TEE."""
    if tee not in REGISTRY.tees:
        raise ValueError(f"register the facts of TEE {tee!r} (register_tee) before its verifier")
    _new("verifier for TEE", tee, REGISTRY.verifiers)
    REGISTRY.verifiers[tee] = verifier
    if describe is not None:
        REGISTRY.describers[tee] = describe


def register_provider(name: str, factory: ProviderFactory) -> None:
    """Register a provider a site may name in ``attestation.provider``."""
    _new("attestation provider", name, REGISTRY.providers)
    REGISTRY.providers[name] = factory


def registered_tees() -> tuple[TeeInfo, ...]:
    """The registered TEEs' facts: real TEEs first, then simulation-only ones, each in registration order."""
    _ensure_loaded()
    tees = REGISTRY.tees.values()
    return tuple(t for t in tees if not t.simulation_only) + tuple(t for t in tees if t.simulation_only)


def tee_names() -> tuple[str, ...]:
    """The registered TEE types, in the order of :func:`registered_tees`."""
    return tuple(t.name for t in registered_tees())


def tee_info(tee: str) -> TeeInfo | None:
    """The facts registered for ``tee``, or None for an unknown TEE type."""
    _ensure_loaded()
    return REGISTRY.tees.get(tee)


def provider_names() -> tuple[str, ...]:
    """The registered provider names, in registration order."""
    _ensure_loaded()
    return tuple(REGISTRY.providers)


def verifier_for(tee: str) -> Verifier:
    """The verifier registered for ``tee``; raises AttestationError for an unknown TEE type."""
    _ensure_loaded()
    verifier = REGISTRY.verifiers.get(tee)
    if verifier is None:
        raise AttestationError(f"unknown TEE type {tee!r}")
    return verifier


def describer_for(tee: str) -> Describer | None:
    """The ``inspect`` describer registered for ``tee``, if any."""
    _ensure_loaded()
    return REGISTRY.describers.get(tee)


def make_provider(name: str, *, state_dir: str | Path, command: Sequence[str] = (),
                  configfs_root: str | Path | None = None) -> Provider:
    """The provider ``name`` (one of :func:`provider_names`) for a site whose private state lives in ``state_dir``.

    Args:
        name: the registered provider name (``software``, ``tdx``, ...).
        state_dir: the site's private state directory (the software provider keeps its key there).
        command: the ``command`` provider's tool and arguments.
        configfs_root: the configfs-tsm report directory (default: the kernel's).

    Returns:
        The provider, ready to produce evidence.

    Raises:
        AttestationError: ``name`` is not a registered provider, or the provider cannot be set up.
    """
    _ensure_loaded()
    factory = REGISTRY.providers.get(name)
    if factory is None:
        raise AttestationError(f"unknown attestation provider {name!r}. Fix: use one of {', '.join(provider_names())}")
    return factory(ProviderSettings(Path(state_dir), tuple(command),
                                    Path(configfs_root) if configfs_root is not None else None))
