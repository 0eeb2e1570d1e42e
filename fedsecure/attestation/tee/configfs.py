"""The ``tdx`` and ``sev-snp`` providers: evidence from the Linux configfs-tsm report interface (site side).

``/sys/kernel/config/tsm/report`` (kernel >= 6.7): create a report entry, write the 64 report-data bytes
to ``inblob``, read ``outblob`` (and ``auxblob``, the host-provided certificates on SEV-SNP), check that
``provider`` names the expected TEE and that ``generation`` moved by exactly one (no other writer raced
us), remove the entry.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from fedsecure.attestation.base import ProviderSettings, check_report_data, register_provider
from fedsecure.attestation.evidence import Evidence
from fedsecure.errors import AttestationError

log = logging.getLogger(__name__)

CONFIGFS_TSM = "/sys/kernel/config/tsm/report"
#: TEE type -> the configfs-tsm backend that serves it
TSM_BACKENDS = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}


class ConfigfsTsmProvider:
    """TDX or SEV-SNP evidence through the kernel's configfs-tsm report interface."""

    def __init__(self, tee: str, root: str | Path = CONFIGFS_TSM) -> None:
        if tee not in TSM_BACKENDS:
            raise AttestationError(f"configfs-tsm serves tdx and sev-snp, not {tee!r}")
        self.tee, self.name, self.root = tee, tee, Path(root)

    def evidence(self, report_data: bytes) -> Evidence:
        """A quote or report over ``report_data`` from a fresh configfs-tsm entry (removed afterwards)."""
        check_report_data(report_data)
        if not self.root.is_dir():
            raise AttestationError(f"{self.root} does not exist: this machine offers no configfs-tsm (not a TDX or "
                                   "SEV-SNP guest, kernel older than 6.7, or configfs not mounted). Fix: run the site "
                                   "in a confidential VM, `mount -t configfs none /sys/kernel/config`, or choose "
                                   "another attestation provider")
        entry = self.root / f"fedsecure-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            entry.mkdir()
        except OSError as e:
            raise AttestationError(f"cannot create {entry} ({e.strerror}). Fix: the site process needs write access "
                                   "to configfs-tsm (root, or a udev rule for the tsm group)") from None
        try:
            backend = (entry / "provider").read_text().strip()
            if backend != TSM_BACKENDS[self.tee]:
                raise AttestationError(f"configfs-tsm is backed by {backend!r}, not {TSM_BACKENDS[self.tee]!r}: "
                                       f"this guest is not a {self.tee} guest. Fix: set the site's provider to "
                                       "match its TEE")
            before = int((entry / "generation").read_text())
            (entry / "inblob").write_bytes(report_data)
            out = (entry / "outblob").read_bytes()
            aux_path = entry / "auxblob"
            aux = aux_path.read_bytes() if aux_path.exists() else b""
            after = int((entry / "generation").read_text())
            if after != before + 1:
                raise AttestationError(f"configfs-tsm generation moved from {before} to {after}: another process "
                                       "wrote this report entry concurrently; retry")
        except OSError as e:
            raise AttestationError(f"configfs-tsm {entry}: {e.strerror or e}") from None
        finally:
            try:
                entry.rmdir()
            except OSError:
                log.warning("could not remove configfs-tsm entry %s", entry)
        if not out:
            raise AttestationError("configfs-tsm returned empty evidence")
        return Evidence(self.tee, out, "configfs-tsm", {"auxblob": aux} if aux else {})


def _factory(tee: str) -> Callable[[ProviderSettings], ConfigfsTsmProvider]:
    def make(settings: ProviderSettings) -> ConfigfsTsmProvider:
        return ConfigfsTsmProvider(tee, settings.configfs_root or CONFIGFS_TSM)
    return make


def register() -> None:
    """Register the ``tdx`` and ``sev-snp`` providers."""
    for tee in TSM_BACKENDS:
        register_provider(tee, _factory(tee))
