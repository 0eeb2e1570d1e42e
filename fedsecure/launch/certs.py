"""Consortium key material for a deployment, made with ``cryptography`` (``fedsecure certs``).

Layout of ``--out DIR``::

    ca.pem, ca.key                 the consortium CA (ECDSA P-384, 5 years); keep ca.key offline
    coordinator.pem, coordinator.key   the coordinator's TLS certificate (SANs: the names and addresses it
                                   serves; serverAuth), signed by the CA
    sites/<site>/auth.key, auth.pub    the site's SuperNode authentication key pair (ECDSA P-384, OpenSSH
                                   format, as flower-supernode and `flwr supernode register` read them)

Private keys are written 0600 through a temporary file and a rename; nothing existing is
overwritten unless ``force``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsecure._durable import atomic_write
from fedsecure.errors import ConfigError, KeyMaterialError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Material:
    """Where the consortium's key material lives under one folder."""
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, tuple[Path, Path]]  # site -> (private key, public key)

    @classmethod
    def at(cls, out: str | Path, sites: Iterable[str] = ()) -> Material:
        """The files under ``out`` (the CA, the coordinator's key pair, each site's key pair)."""
        d = Path(out)
        return cls(d / "ca.pem", d / "ca.key", d / "coordinator.pem", d / "coordinator.key",
                   {s: (d / "sites" / s / "auth.key", d / "sites" / s / "auth.pub") for s in sites})


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsecure consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _sans(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _check_free(paths: Iterable[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyMaterialError(f"{existing[0]} already exists ({len(existing)} file(s) would be overwritten). "
                               "Fix: choose another --out, or pass --force to replace them (sites and the "
                               "coordinator then need the new files)")


def create_ca(m: Material, *, days: int = 5 * 365, force: bool = False) -> None:
    """Create the consortium CA (ECDSA P-384, self-signed); refuses to overwrite without ``force``."""
    _check_free([m.ca_cert, m.ca_key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _dt.datetime.now(_dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedsecure consortium CA")).issuer_name(_name(
        "fedsecure consortium CA")).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384()))
    atomic_write(m.ca_key, _pem_key(key))
    atomic_write(m.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_ca(m: Material) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(m.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise KeyMaterialError(f"cannot load the consortium CA from {m.ca_cert.parent} ({e}). Fix: run "
                               "`fedsecure certs init` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{m.ca_key} is not an EC key")
    return cert, key


def create_server_cert(m: Material, hosts: Iterable[str], *, days: int = 825, force: bool = False) -> None:
    """Create the coordinator's TLS certificate for ``hosts`` (names and addresses), signed by the CA."""
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise ConfigError("the coordinator certificate needs at least one --host (name or address it serves)")
    _check_free([m.server_cert, m.server_key], force)
    ca_cert, ca_key = _load_ca(m)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _dt.datetime.now(_dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    atomic_write(m.server_key, _pem_key(key))
    atomic_write(m.server_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def create_site_key(m: Material, site: str, *, force: bool = False) -> None:
    """Create a site's SuperNode authentication key pair (OpenSSH ECDSA, private key 0600)."""
    if not SITE_NAME.match(site):
        raise ConfigError(f"site name {site!r} must be 1-63 letters, digits, '.', '_' or '-'")
    priv, pub = m.sites[site]
    _check_free([priv, pub], force)
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
    atomic_write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH) + f" {site}\n".encode(),
                 mode=0o644)


def init(out: str | Path, hosts: Iterable[str], sites: Iterable[str], *, force: bool = False) -> Material:
    """CA (unless one exists and ``force`` is off, in which case it is reused), coordinator cert, site keys."""
    sites = list(dict.fromkeys(sites))
    m = Material.at(out, sites)
    if not (m.ca_cert.exists() and m.ca_key.exists()) or force:
        create_ca(m, force=force)
    create_server_cert(m, hosts, force=force)
    for s in sites:
        create_site_key(m, s, force=force)
    return m
