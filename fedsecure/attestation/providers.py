"""Evidence providers, at the site: ``provider.evidence(report_data) -> Evidence``.

- ``tdx`` / ``sev-snp``: Linux configfs-tsm (``/sys/kernel/config/tsm/report``, kernel >= 6.7): create
  a report entry, write the 64 report-data bytes to ``inblob``, read ``outblob`` (and ``auxblob``,
  the host-provided certificates on SEV-SNP), check ``provider`` names the expected TEE and that
  ``generation`` moved by exactly one (no other writer raced us), remove the entry.
- ``nvidia-gpu``: NVIDIA's attestation SDK, when installed (else a clear error).
- ``command``: an external tool (a cloud attestation agent) run with ``{report_data}`` replaced by
  the hex report data; it prints a fedsecure evidence envelope or raw TDX/SNP evidence.
- ``software``: an Ed25519-signed statement from a key kept in the site's state directory; for
  development and simulation only, and it warns on every use.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import shlex
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure.attestation.evidence import MAX_EVIDENCE_BYTES, Evidence, code_hash, detect
from fedsecure.attestation.verify import SOFTWARE_WARNING, SoftwareAttestationWarning, gpu_nonce, nvidia_sdk
from fedsecure.errors import AttestationError
from fedsecure.fsutil import atomic_write

log = logging.getLogger(__name__)

PROVIDERS = ("software", "tdx", "sev-snp", "nvidia-gpu", "command")
CONFIGFS_TSM = "/sys/kernel/config/tsm/report"
_TSM_NAMES = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}


def _check_rd(report_data: bytes) -> None:
    if len(report_data) != 64:
        raise AttestationError(f"report data must be 64 bytes, got {len(report_data)}")


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 key kept as a 0600 PKCS#8 PEM file; created on first use."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise AttestationError(f"{path} is readable by group or others. Fix: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError:
            raise AttestationError(f"{path} is not a PEM private key (damaged?). Fix: restore it from backup; "
                                   "deleting it makes a new node identity the coordinator has not seen") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AttestationError(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return key


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SoftwareProvider:
    """Signs ``{report_data, measurement = code hash, issued_at}`` with a local Ed25519 key."""

    name = "software"

    def __init__(self, key_path: str | Path, measurement: str | None = None) -> None:
        self.key = load_or_create_ed25519(Path(key_path))
        self.measurement = measurement or code_hash()

    def evidence(self, report_data: bytes) -> Evidence:
        _check_rd(report_data)
        warnings.warn(SOFTWARE_WARNING, SoftwareAttestationWarning, stacklevel=2)
        log.warning("software attestation evidence (simulation only)")
        statement = json.dumps({"fedsecure-software-evidence": 1, "public_key": raw_public(self.key).hex(),
                                "report_data": report_data.hex(), "measurement": self.measurement,
                                "issued_at": _dt.datetime.now(_dt.UTC).isoformat()},
                               sort_keys=True, separators=(",", ":")).encode()
        return Evidence("software", statement, "software", {"signature": self.key.sign(statement)})


class ConfigfsTsmProvider:
    """TDX or SEV-SNP evidence through the kernel's configfs-tsm report interface."""

    def __init__(self, tee: str, root: str | Path = CONFIGFS_TSM) -> None:
        if tee not in _TSM_NAMES:
            raise AttestationError(f"configfs-tsm serves tdx and sev-snp, not {tee!r}")
        self.tee, self.name, self.root = tee, tee, Path(root)

    def evidence(self, report_data: bytes) -> Evidence:
        _check_rd(report_data)
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
            if backend != _TSM_NAMES[self.tee]:
                raise AttestationError(f"configfs-tsm is backed by {backend!r}, not {_TSM_NAMES[self.tee]!r}: "
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


class NvidiaGpuProvider:
    """GPU confidential-computing evidence from NVIDIA's attestation SDK (nonce = SHA-256 of the report data)."""

    name = "nvidia-gpu"

    def evidence(self, report_data: bytes) -> Evidence:
        _check_rd(report_data)
        attestation = nvidia_sdk()
        client = attestation.Attestation()
        client.set_nonce(gpu_nonce(report_data))
        client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
        return Evidence("nvidia-gpu", json.dumps(client.get_evidence()).encode(), "nvidia-sdk")


class CommandProvider:
    """Runs an external attestation tool; ``{report_data}`` in its arguments becomes the hex report data."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float = 60.0) -> None:
        if not argv:
            raise AttestationError("the command provider needs attestation.command (the tool and its arguments). "
                                   "Fix: e.g. attestation.command: [\"/usr/bin/attest-agent\", \"--nonce\", "
                                   "\"{report_data}\"]")
        self.argv, self.timeout_s = list(argv), timeout_s

    def evidence(self, report_data: bytes) -> Evidence:
        _check_rd(report_data)
        argv = [a.replace("{report_data}", report_data.hex()) for a in self.argv]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise AttestationError(f"attestation command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise AttestationError(f"attestation command {shlex.join(argv[:1])} ran over {self.timeout_s:g} s") \
                from None
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-300:]
            raise AttestationError(f"attestation command {argv[0]} exited {proc.returncode}: {tail}")
        if len(proc.stdout) > MAX_EVIDENCE_BYTES:
            raise AttestationError(f"attestation command printed over {MAX_EVIDENCE_BYTES} bytes")
        ev = detect(proc.stdout)
        return Evidence(ev.tee, ev.blob, ev.provider if ev.provider not in ("", "file") else "command", ev.aux)


def make_provider(name: str, *, state_dir: str | Path, command: Sequence[str] = (),
                  configfs_root: str | Path = CONFIGFS_TSM):
    """The provider ``name`` (one of :data:`PROVIDERS`) for a site whose private state lives in ``state_dir``."""
    if name == "software":
        return SoftwareProvider(Path(state_dir) / "attestation" / "software-signer.pem")
    if name in ("tdx", "sev-snp"):
        return ConfigfsTsmProvider(name, configfs_root)
    if name == "nvidia-gpu":
        return NvidiaGpuProvider()
    if name == "command":
        return CommandProvider(command)
    raise AttestationError(f"unknown attestation provider {name!r}. Fix: use one of {', '.join(PROVIDERS)}")
