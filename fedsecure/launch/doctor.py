"""``fedsecure doctor``: a pre-flight check of a site's or the coordinator's deployment, changing nothing.

Each check gives OK, WARN or FAIL with what was found and, where it failed, the fix. A FAIL means the process
would not start or would run unsafely (unreadable config, a key file others can read, a tampered ledger, an
expired certificate); a WARN is worth knowing (the coordinator not reachable yet, software attestation, little
disk). Nothing is created: no keyring, no state folder, no ledger entry.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsecure.errors import FedSecureError

MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    status: str  # OK | WARN | FAIL
    name: str
    detail: str


def _private(path: Path, what: str) -> Check:
    if not path.is_file():
        return Check("FAIL", what, f"{path} is missing. Fix: restore it (see the README's Deployment section).")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Check("FAIL", what, f"{path} has mode {oct(mode)}: others can read it. Fix: chmod 600 {path}")
    return Check("OK", what, f"{path} (mode {oct(mode)})")


def _ssh_key(path: Path) -> Check:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    check = _private(path, "SuperNode key")
    if check.status != "OK":
        return check
    try:
        load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        return Check("FAIL", "SuperNode key", f"{path} is not an OpenSSH private key ({e}). Fix: restore the key "
                                              "`fedsecure certs add-site` wrote for this site.")
    return check


def _certificate(path: Path, what: str, host: str | None = None) -> Check:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        return Check("FAIL", what, f"{path} cannot be read as a PEM certificate ({e}). Fix: `fedsecure certs init`.")
    now = _dt.datetime.now(_dt.UTC)
    if cert.not_valid_after_utc <= now:
        return Check("FAIL", what, f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}. Fix: issue a new one.")
    left = (cert.not_valid_after_utc - now).days
    if host is not None:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(
                x509.IPAddress)}
        except x509.ExtensionNotFound:
            names = set()
        if host not in names and host not in ("0.0.0.0", "::"):
            return Check("FAIL", what, f"{path} does not name {host} (it names {', '.join(sorted(names))}). Fix: "
                                       f"`fedsecure certs init --host {host}`.")
    return Check("WARN" if left < 30 else "OK", what, f"{path}: valid for {left} more days")


def _disk(folder: Path) -> Check:
    probe = folder if folder.exists() else folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    status = "OK" if free >= MIN_FREE_BYTES else "WARN"
    return Check(status, "disk", f"{free / (1 << 30):.1f} GiB free under {probe}")


def _reachable(address: str, timeout: float = 3.0) -> Check:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        return Check("WARN", "coordinator", f"{address} does not answer ({e}); fine if the coordinator is not "
                                            "started yet")
    return Check("OK", "coordinator", f"{address} accepts connections")


def site_checks(config: Path) -> list[Check]:
    """Every check of a site's deployment (its ``site.yaml``)."""
    from fedsecure.launch.deploy_config import load_site_config

    try:
        sc = load_site_config(config)
    except FedSecureError as e:
        return [Check("FAIL", "config", str(e))]
    out = [Check("OK", "config", f"{config}: site {sc.name}, its privacy policy checked against its data")]
    out.append(_certificate(sc.tls_ca, "consortium CA"))
    out.append(_ssh_key(sc.auth_key))
    keyring, ring = _keyring(sc.settings)
    out.append(keyring)
    out += _ledgers(sc.state_dir, ring)
    provider = sc.settings.attestation.provider
    if provider == "software":
        out.append(Check("WARN", "attestation", "provider software: development only, it proves nothing about "
                                                "this machine; a production coordinator will refuse it"))
    elif provider in ("tdx", "sev-snp"):
        root = Path(sc.settings.attestation.configfs_root)
        out.append(Check("OK" if root.is_dir() else "FAIL", "attestation",
                         f"{provider}: {root} " + ("present" if root.is_dir() else
                                                   "is missing. Fix: run inside the TEE guest with configfs-tsm")))
    else:
        out.append(Check("OK", "attestation", f"provider {provider}"))
    out.append(_secagg_site(sc))
    out.append(_disk(sc.state_dir))
    out.append(_telemetry())
    out.append(_reachable(sc.superlink))
    return out


def _secagg_site(sc: Any) -> Check:
    """The site's secure-aggregation roster: readable, naming this site with this site's own node key."""
    from fedsecure.attestation.keys import raw_public
    from fedsecure.secagg.protocol import raw
    from fedsecure.secagg.roster import load_roster

    roster_path = sc.settings.secagg_roster
    if not roster_path:
        if sc.settings.privacy.require_secure_aggregation:
            return Check("FAIL", "secure aggregation", "site.privacy.require_secure_aggregation is on but site.yaml "
                                                       "names no secagg_roster: this site can train in no run. Fix: "
                                                       "add the consortium's roster (fedsecure attest roster)")
        return Check("OK", "secure aggregation", "no roster: this site can take part only in runs without it")
    try:
        roster = load_roster(roster_path)
    except FedSecureError as e:
        return Check("FAIL", "secure aggregation", str(e))
    if sc.name not in roster:
        return Check("FAIL", "secure aggregation", f"{roster_path} does not name this site ({sc.name}). Fix: send "
                                                   "`fedsecure attest node-key` output to the consortium")
    node_key = sc.state_dir / "attestation" / "node-key.pem"
    if not node_key.is_file():
        return Check("WARN", "secure aggregation", f"{node_key} does not exist yet. Fix: `fedsecure attest node-key "
                                                   "--config site.yaml` makes it and prints this site's roster line")
    from fedsecure.attestation.keys import load_or_create_ed25519

    if raw_public(load_or_create_ed25519(node_key)) != raw(roster[sc.name]):
        return Check("FAIL", "secure aggregation", f"the roster's key for {sc.name} is not this site's node key "
                                                   f"({node_key}): the coordinator and every peer would exclude it. "
                                                   "Fix: send `fedsecure attest node-key` output to the consortium")
    return Check("OK", "secure aggregation", f"{roster_path}: {len(roster)} sites, this site's node key matches")


def _keyring(site: Any) -> tuple[Check, Any]:
    """The keyring check and the keyring itself (None when sealing is off, the file is not there yet, it comes from
    a command the doctor does not run, or it failed), loaded once for the ledger checks too.
    """
    from fedsecure.crypto.keys import load_keyring
    from fedsecure.store.keyrings import default_site_keyring_path

    st = site.storage
    if not st.seal:
        return Check("WARN", "keyring", "site.storage.seal is off: ledgers and adapters are stored in the clear"), None
    if st.key_provider == "command":
        return Check("OK", "keyring", f"from a command ({st.key_command}); not run by the doctor"), None
    default = default_site_keyring_path(str(site.state_dir), str(site.name))
    if st.key_provider == "file":
        path = Path(st.keyring) if st.keyring else default
        if not st.keyring and not path.exists():
            why = (f"{path} does not exist yet: the site creates it (0600) at its first start. Keep a backup: "
                   "without it the sealed ledgers cannot be opened")
            return Check("WARN", "keyring", why), None
        check = _private(path, "keyring")
        if check.status != "OK":
            return check, None
    try:
        ring = load_keyring(st.key_provider, keyring_path=st.keyring, default_path=default, create_default=False)
    except FedSecureError as e:
        return Check("FAIL", "keyring", str(e)), None
    return Check("OK", "keyring", f"{st.key_provider}: current key {ring.current if ring else 'n/a'}"), ring


def _ledgers(state: Path, ring: Any) -> list[Check]:
    from fedsecure.privacy.ledger import ledger_files, open_ledger_file

    files = ledger_files(state)
    if not files:
        return [Check("OK", "ledgers", f"none yet in {state}")]
    out = []
    for f in files:
        try:
            led = open_ledger_file(f, ring)
            out.append(Check("OK", "ledger", f"{f.name}: {len(led.entries)} entries, chain intact, ε recomputed"))
        except FedSecureError as e:  # a sealed ledger without its keyring fails here, naming the keyring
            out.append(Check("FAIL", "ledger", str(e)))
    return out


def _telemetry() -> Check:
    from fedsecure import NO_PHONE_HOME

    wrong = [k for k, v in NO_PHONE_HOME.items() if os.environ.get(k) != v]
    if wrong:
        return Check("FAIL", "telemetry", f"{', '.join(wrong)} not set as fedsecure sets them")
    return Check("OK", "telemetry", "Flower, Ray and Hugging Face telemetry off; no hub downloads")


def coordinator_checks(config: Path) -> list[Check]:
    """Every check of the coordinator's deployment (its ``coordinator.yaml``)."""
    from fedsecure.launch.deploy_config import load_coordinator_config

    try:
        cc = load_coordinator_config(config)
    except FedSecureError as e:
        return [Check("FAIL", "config", str(e))]
    out = [Check("OK", "config", f"{config}: {len(cc.sites)} sites, attestation policy loaded")]
    out.append(_certificate(cc.tls_ca, "consortium CA"))
    out.append(_certificate(cc.tls_cert, "coordinator certificate", cc.host))
    out.append(_private(cc.tls_key, "coordinator TLS key"))
    for name, pub in sorted(cc.sites.items()):
        out.append(Check("OK" if pub.is_file() else "FAIL", f"site {name}",
                         f"{pub}" + ("" if pub.is_file() else " is missing. Fix: `fedsecure certs add-site`")))
    try:
        with socket.socket(socket.AF_INET6 if ":" in cc.host else socket.AF_INET) as s:
            s.bind((cc.host, cc.port))
        out.append(Check("OK", "port", f"{cc.address} is free"))
    except OSError as e:
        out.append(Check("WARN", "port", f"{cc.address} cannot be bound ({e.strerror}): a coordinator may be running"))
    sa = cc.federation.federation.secure_aggregation
    if sa.enabled:
        out.append(_secagg_coordinator(sa.roster, sorted(cc.sites)))
    out.append(_disk(cc.run_dir))
    out.append(_telemetry())
    return out


def _secagg_coordinator(roster_path: str | None, sites: list[str]) -> Check:
    """The coordinator's roster names every registered site."""
    from fedsecure.secagg.roster import load_roster

    if not roster_path:
        return Check("FAIL", "secure aggregation", "federation.secure_aggregation is on without a roster. Fix: set "
                                                   "federation.secure_aggregation.roster (fedsecure attest roster)")
    try:
        roster = load_roster(roster_path)
    except FedSecureError as e:
        return Check("FAIL", "secure aggregation", str(e))
    missing = [s for s in sites if s not in roster]
    if missing:
        return Check("FAIL", "secure aggregation", f"{roster_path} does not name {missing}: they would be left out "
                                                   "of every round. Fix: add their `fedsecure attest node-key` lines")
    return Check("OK", "secure aggregation", f"{roster_path}: every registered site named")


def run_checks(config: Path) -> list[Check]:
    """The checks for ``config``: a site's ``site.yaml`` or the coordinator's ``coordinator.yaml``."""
    import yaml

    try:
        doc = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        return [Check("FAIL", "config", f"{config} cannot be read: {e}")]
    if isinstance(doc, dict) and "site" in doc:
        return site_checks(Path(config))
    return coordinator_checks(Path(config))


def site_settings_of(config: Path):
    """A site config's own settings (for the machine checks), or None for a coordinator's or a broken one."""
    from fedsecure.launch.deploy_config import load_site_config

    try:
        return load_site_config(config).settings
    except FedSecureError:
        return None
