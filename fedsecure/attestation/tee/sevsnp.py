"""AMD SEV-SNP attestation report verification, with ``cryptography`` only.

Checks, in order (each failure raises :class:`~fedsecure.errors.AttestationError` naming it):

1. The ARK certificate's public key is a pinned AMD root (SHA-256 of its SubjectPublicKeyInfo);
   ARK is self-signed, ASK is signed by ARK and the VCEK by ASK (RSASSA-PSS, SHA-384), and every
   certificate is valid at ``at_time`` (a parameter: test evidence is old).
2. The report is 1184 bytes, version 2 or later, signature algorithm 1 (ECDSA P-384 / SHA-384),
   and its signature (r, s as 72-byte little-endian integers at 0x2A0) verifies with the VCEK
   over bytes 0x000-0x29F.
3. The VCEK belongs to this chip and TCB: its hwID extension equals CHIP_ID and its SPL
   extensions equal REPORTED_TCB (so a VCEK for an older, vulnerable TCB cannot vouch).
4. Optionally, REPORT_DATA equals what the verifier expected (the challenge binding) and the
   MEASUREMENT is in an allow-list: NVIDIA FLARE's SNP authorizer compares no measurement.

Report layout: AMD SEV-SNP ABI specification, "ATTESTATION_REPORT structure".

Registers the ``sev-snp`` TEE (MEASUREMENT: 96 hex digits), its verifier (:func:`verify_evidence`,
which finds the VCEK in the evidence or the policy's VCEK cache) and its ``inspect`` fields
(:func:`describe`). Sites obtain reports through :mod:`~fedsecure.attestation.tee.configfs`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from fedsecure.attestation.base import Claims, TeeInfo, VerifyRequest, register_tee, register_verifier
from fedsecure.attestation.evidence import Evidence
from fedsecure.errors import AttestationError

REPORT_SIZE = 0x4A0
SIGNED_END = 0x2A0

#: SHA-256 of the SubjectPublicKeyInfo of AMD's ARK-Milan root (from AMD's key distribution service).
AMD_ARK_PINS = {
    "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9": "ARK-Milan",
}

_SPL_OIDS = {"bl": "1.3.6.1.4.1.3704.1.3.1", "tee": "1.3.6.1.4.1.3704.1.3.2", "snp": "1.3.6.1.4.1.3704.1.3.3",
             "ucode": "1.3.6.1.4.1.3704.1.3.8"}
_HWID_OID = "1.3.6.1.4.1.3704.1.4"


@dataclass(frozen=True)
class SnpReport:
    """A parsed (not yet verified) SEV-SNP attestation report."""

    version: int
    guest_svn: int
    policy: int
    vmpl: int
    signature_algo: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    chip_id: bytes
    reported_tcb: dict[str, int]
    raw: bytes

    @property
    def signed(self) -> bytes:
        """The bytes the VCEK signs (0x000-0x29F)."""
        return self.raw[:SIGNED_END]


def _tcb(raw8: bytes) -> dict[str, int]:
    # Milan/Genoa TCB_VERSION: byte 0 boot loader, 1 TEE, 6 SNP, 7 microcode (2-5 reserved)
    return {"bl": raw8[0], "tee": raw8[1], "snp": raw8[6], "ucode": raw8[7]}


def parse_report(raw: bytes) -> SnpReport:
    """Parse a 1184-byte SEV-SNP report (version >= 2, ECDSA P-384); raises AttestationError if it is not one."""
    if len(raw) != REPORT_SIZE:
        raise AttestationError(f"SEV-SNP report must be {REPORT_SIZE} bytes; got {len(raw)}")
    u32 = lambda off: int.from_bytes(raw[off:off + 4], "little")  # noqa: E731
    report = SnpReport(version=u32(0x00), guest_svn=u32(0x04), policy=int.from_bytes(raw[0x08:0x10], "little"),
                       vmpl=u32(0x30), signature_algo=u32(0x34), report_data=raw[0x50:0x90],
                       measurement=raw[0x90:0xC0], host_data=raw[0xC0:0xE0], chip_id=raw[0x1A0:0x1E0],
                       reported_tcb=_tcb(raw[0x180:0x188]), raw=bytes(raw))
    if report.version < 2:
        raise AttestationError(f"SEV-SNP report version {report.version} is not supported (need >= 2)")
    if report.signature_algo != 1:
        raise AttestationError(f"SEV-SNP signature algorithm {report.signature_algo} is not ECDSA P-384/SHA-384")
    return report


def _spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _check_signed_by(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"{what}: issuer key is not RSA as AMD's ARK/ASK are")
    try:
        # AMD signs with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt length 48
        key.verify(child.signature, child.tbs_certificate_bytes,
                   padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())
    except InvalidSignature:
        raise AttestationError(f"{what}: certificate signature does not verify") from None
    if child.issuer != issuer.subject:
        raise AttestationError(f"{what}: issuer name does not match")


def check_validity(cert: x509.Certificate, at: _dt.datetime, what: str) -> None:
    """Raise AttestationError saying whether ``cert`` had expired or was not yet valid at ``at``."""
    if at > cert.not_valid_after_utc:
        raise AttestationError(f"{what}: certificate expired on {cert.not_valid_after_utc.isoformat()} (verification "
                               f"time {at.isoformat()}). Fix: get current evidence and certificates; to check old "
                               "evidence, pass the time it was made (--at)")
    if at < cert.not_valid_before_utc:
        raise AttestationError(f"{what}: certificate is not valid before {cert.not_valid_before_utc.isoformat()} "
                               f"(verification time {at.isoformat()})")


def _ext_bytes(cert: x509.Certificate, oid: str, lacks: str) -> bytes:
    """The raw value of one of AMD's VCEK extensions (which ``cryptography`` does not interpret)."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"VCEK lacks {lacks}") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise AttestationError(f"VCEK extension {oid} is not AMD's raw extension ({type(ext).__name__})")
    return ext.value


def _ext_int(cert: x509.Certificate, oid: str) -> int:
    raw = _ext_bytes(cert, oid, f"extension {oid}")
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:  # DER INTEGER
        raise AttestationError(f"VCEK extension {oid} is not a DER INTEGER")
    return int.from_bytes(raw[2:], "big")


@dataclass(frozen=True)
class SnpClaims:
    """What a verified SEV-SNP report says (hex strings)."""

    measurement: str
    report_data: str
    host_data: str
    chip_id: str
    tcb: dict[str, int]
    policy: int
    vmpl: int
    root: str


def verify(report_bytes: bytes, vcek_der: bytes, chain_pem: bytes, *, at_time: _dt.datetime | None = None,
           expected_report_data: bytes | None = None, allowed_measurements: Iterable[str] | None = None,
           pins: dict[str, str] | None = None) -> SnpClaims:
    """Verify end to end; returns the claims or raises AttestationError (also for damaged certificates, whose
    fields may fail to parse only when read).
    """
    try:
        return _verify(report_bytes, vcek_der, chain_pem, at_time=at_time, expected_report_data=expected_report_data,
                       allowed_measurements=allowed_measurements, pins=pins)
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise AttestationError(f"malformed evidence or certificate ({type(e).__name__}: {e})") from None


def _verify(report_bytes: bytes, vcek_der: bytes, chain_pem: bytes, *, at_time: _dt.datetime | None = None,
           expected_report_data: bytes | None = None, allowed_measurements: Iterable[str] | None = None,
           pins: dict[str, str] | None = None) -> SnpClaims:
    """Verify an SEV-SNP report end to end; returns its claims or raises AttestationError."""
    at = at_time or _dt.datetime.now(_dt.UTC)
    report = parse_report(report_bytes)
    try:
        with warnings.catch_warnings():
            # AMD's key distribution service issues VCEKs with a non-positive serial number (RFC 5280 forbids it),
            # and cryptography warns on parsing one. Accepting it is safe: a VCEK's trust comes from the chain
            # check below (signed by the ASK, signed by the pinned ARK) and its hwID/TCB binding, never from its
            # serial number, which nothing here reads. Only this warning, only for this one certificate.
            warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive",
                                    category=CryptographyDeprecationWarning)
            vcek = x509.load_der_x509_certificate(vcek_der)
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise AttestationError(f"cannot parse the VCEK or the ASK/ARK chain ({e})") from None
    try:
        by_cn = {c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value: c for c in certs}
    except (ValueError, IndexError):
        raise AttestationError("a certificate name in the ASK/ARK chain does not parse (damaged chain)") from None
    ark = next((c for cn, c in by_cn.items() if str(cn).startswith("ARK")), None)
    ask = next((c for cn, c in by_cn.items() if str(cn).startswith(("ASK", "SEV"))), None)
    if ark is None or ask is None:
        raise AttestationError("the chain must hold the ASK and the ARK certificates")
    pins = AMD_ARK_PINS if pins is None else pins
    root = pins.get(_spki_sha256(ark))
    if root is None:
        raise AttestationError("the ARK is not a pinned AMD root key")
    _check_signed_by(ark, ark, "ARK")
    _check_signed_by(ask, ark, "ASK")
    _check_signed_by(vcek, ask, "VCEK")
    for cert, what in ((ark, "ARK"), (ask, "ASK"), (vcek, "VCEK")):
        check_validity(cert, at, what)
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError("VCEK key is not ECDSA P-384")
    sig = report.raw[SIGNED_END:SIGNED_END + 144]
    r, s = int.from_bytes(sig[:72], "little"), int.from_bytes(sig[72:144], "little")
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("report signature does not verify with the VCEK (report altered or wrong VCEK)") \
            from None
    hwid = _ext_bytes(vcek, _HWID_OID, "the hwID extension")
    if hwid != report.chip_id:
        raise AttestationError("VCEK hwID does not match the report's CHIP_ID")
    for name, oid in _SPL_OIDS.items():
        if _ext_int(vcek, oid) != report.reported_tcb[name]:
            raise AttestationError(f"VCEK {name} SPL {_ext_int(vcek, oid)} != REPORTED_TCB "
                                   f"{report.reported_tcb[name]}: the VCEK is for another TCB")
    if expected_report_data is not None and report.report_data != expected_report_data:
        raise AttestationError("REPORT_DATA does not match the challenge (stale, replayed or unbound evidence)")
    measurement = report.measurement.hex()
    if allowed_measurements is not None and measurement not in set(allowed_measurements):
        raise AttestationError(f"measurement {measurement[:16]}... is not in the policy's allow-list")
    return SnpClaims(measurement=measurement, report_data=report.report_data.hex(), host_data=report.host_data.hex(),
                     chip_id=report.chip_id.hex(), tcb=report.reported_tcb, policy=report.policy, vmpl=report.vmpl,
                     root=root)


# ---------------------------------------------------------------------------- registry entry points
def snp_certs(evidence: Evidence, vcek_dir: str | Path | None) -> tuple[bytes, bytes]:
    """The VCEK and ASK/ARK chain: from the evidence's aux blobs (checked against the pinned root like any
    other), else from the VCEK cache directory (<chip_id hex>.der, cert_chain.pem).
    """
    vcek, chain = evidence.aux.get("vcek"), evidence.aux.get("cert_chain")
    if vcek is not None and chain is not None:
        return vcek, chain
    chip = parse_report(evidence.blob).chip_id.hex()
    if not vcek_dir:
        raise AttestationError(f"no VCEK for chip {chip[:16]}...: the evidence carries none and no vcek_dir is "
                               "configured. Fix: set vcek_dir in the policy to a cache holding <chip_id>.der and "
                               "cert_chain.pem (from AMD's key distribution service)")
    d = Path(vcek_dir)
    try:
        vcek = vcek if vcek is not None else (d / f"{chip}.der").read_bytes()
        chain = chain if chain is not None else (d / "cert_chain.pem").read_bytes()
    except OSError as e:
        raise AttestationError(f"VCEK cache {d}: {e.filename} is missing ({e.strerror}). Fix: fetch the VCEK for "
                               f"chip {chip[:16]}... and the ASK/ARK chain into the cache directory") from None
    return vcek, chain


def verify_evidence(evidence: Evidence, request: VerifyRequest) -> Claims:
    """The registered verifier: :func:`verify` with the VCEK from :func:`snp_certs` and the policy's allow-list."""
    vcek, chain = snp_certs(evidence, request.vcek_dir)
    s = verify(evidence.blob, vcek, chain, at_time=request.at, expected_report_data=request.expected_report_data,
               allowed_measurements=request.allowed_measurements)
    return Claims("sev-snp", s.measurement, s.report_data, evidence.provider,
                  {"host_data": s.host_data, "chip_id": s.chip_id, "tcb": s.tcb, "policy": s.policy,
                   "vmpl": s.vmpl, "root": s.root})


def describe(evidence: Evidence) -> dict[str, Any]:
    """The report's fields for ``fedsecure attest inspect`` (parsed, not verified)."""
    r = parse_report(evidence.blob)
    return dict(version=r.version, guest_svn=r.guest_svn, policy=hex(r.policy), vmpl=r.vmpl,
                measurement=r.measurement.hex(), host_data=r.host_data.hex(), report_data=r.report_data.hex(),
                chip_id=r.chip_id.hex(), reported_tcb=r.reported_tcb)


def _recognize(data: bytes) -> bool:
    return len(data) == REPORT_SIZE and 2 <= int.from_bytes(data[:4], "little") <= 5


def register() -> None:
    """Register the ``sev-snp`` TEE (facts, verifier, describer)."""
    register_tee(TeeInfo("sev-snp", "AMD SEV-SNP report, VCEK chain to the pinned AMD ARK; pins MEASUREMENT",
                         measurement_hex=96, raw_format="an SEV-SNP report (1184 bytes)", recognize=_recognize))
    register_verifier("sev-snp", verify_evidence, describe=describe)
