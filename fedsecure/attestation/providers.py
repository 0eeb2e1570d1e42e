"""Evidence providers, at the site: ``provider.evidence(report_data) -> Evidence``.

Each provider lives in its own module under :mod:`fedsecure.attestation.tee` and registers itself;
this module gathers them for sites and keeps the import path callers use:

- ``tdx`` / ``sev-snp``: Linux configfs-tsm (:mod:`~fedsecure.attestation.tee.configfs`).
- ``nvidia-gpu``: NVIDIA's attestation SDK, when installed (:mod:`~fedsecure.attestation.tee.nvidia_gpu`).
- ``command``: an external tool printing evidence (:mod:`~fedsecure.attestation.tee.command`).
- ``software``: an Ed25519-signed statement, simulation only (:mod:`~fedsecure.attestation.tee.software`).

``PROVIDERS`` is the tuple of registered provider names, read from the registry when asked.
"""

from __future__ import annotations

from fedsecure.attestation.base import Provider, ProviderSettings, make_provider, provider_names, register_provider
from fedsecure.attestation.keys import load_or_create_ed25519, raw_public
from fedsecure.attestation.tee.command import CommandProvider
from fedsecure.attestation.tee.configfs import CONFIGFS_TSM, ConfigfsTsmProvider
from fedsecure.attestation.tee.nvidia_gpu import NvidiaGpuProvider
from fedsecure.attestation.tee.software import SoftwareProvider

__all__ = ["CONFIGFS_TSM", "CommandProvider", "ConfigfsTsmProvider", "NvidiaGpuProvider", "Provider",
           "ProviderSettings", "SoftwareProvider", "load_or_create_ed25519", "make_provider", "provider_names",
           "raw_public", "register_provider"]


def __getattr__(name: str) -> tuple[str, ...]:
    """``PROVIDERS``: the registered provider names (:func:`~fedsecure.attestation.base.provider_names`)."""
    if name == "PROVIDERS":
        return provider_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
