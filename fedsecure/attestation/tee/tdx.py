"""Intel TDX quote verification (quote versions 4 and 5, ECDSA P-256), with ``cryptography`` only.

Checks, in order (each failure raises :class:`~fedsecure.errors.AttestationError` naming it):

1. Structure: header (version 4 or 5, attestation key type 2 = ECDSA-256, TEE type 0x81 = TDX),
   the TD report body (TD 1.0, 584 bytes, or TD 1.5, 648 bytes) and the signature data, whose
   certification data must be a QE report (type 6) wrapping a PCK certificate chain (type 5).
2. The quote signature verifies with the attestation key over the header and body.
3. The attestation key is bound into the QE report: REPORTDATA = SHA-256(attestation key || QE
   authentication data) followed by 32 zero bytes.
4. The QE report signature verifies with the PCK certificate's key.
5. The PCK chain (PCK <- platform/processor CA <- root) verifies, every certificate is valid at
   ``at_time`` (a parameter: test evidence is old), and the root's key is a pinned Intel SGX Root CA.
6. Optionally: REPORTDATA equals the challenge, and MRTD is in an allow-list.

Layouts: Intel TDX DCAP Quote Generation Library and Quote Verification Library documentation
(quote v4 and v5, "TD Quote Body").

Registers the ``tdx`` TEE (MRTD: 96 hex digits), its verifier (:func:`verify_evidence`) and its
``inspect`` fields (:func:`describe`). Sites obtain quotes through
:mod:`~fedsecure.attestation.tee.configfs`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fedsecure.attestation.base import Claims, TeeInfo, VerifyRequest, register_tee, register_verifier
from fedsecure.attestation.evidence import Evidence
from fedsecure.attestation.tee.sevsnp import check_validity
from fedsecure.errors import AttestationError

HEADER = 48
TD10_BODY, TD15_BODY = 584, 648
QE_REPORT = 384

#: SHA-256 of the SubjectPublicKeyInfo of Intel's SGX Root CA (it also roots TDX PCK chains).
INTEL_ROOT_PINS = {
    "a0af031289f5d5d4132f9186068a7fc13628633ba235777472e29b6b6c67a49e": "Intel SGX Root CA",
}


@dataclass(frozen=True)
class TdxQuote:
    """A parsed (not yet verified) TDX quote: its body, the signed bytes and the certification data."""

    version: int
    body: bytes
    signed: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes

    def field(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the TD report body from ``offset``."""
        return self.body[offset: offset + size]

    @property
    def mrtd(self) -> bytes:
        """MRTD, the TD's launch measurement (48 bytes)."""
        return self.field(136, 48)

    @property
    def report_data(self) -> bytes:
        """REPORTDATA, the 64 bytes the TD asked to be signed."""
        return self.field(520, 64)

    @property
    def rtmrs(self) -> list[bytes]:
        """RTMR0-3, the runtime measurement registers."""
        return [self.field(328 + 48 * i, 48) for i in range(4)]


def parse_quote(raw: bytes) -> TdxQuote:
    """Parse a version 4 or 5 TDX quote; raises AttestationError naming what is malformed."""
    try:
        version, key_type, tee_type = struct.unpack("<HHI", raw[:8])
        if version not in (4, 5):
            raise AttestationError(f"TDX quote version {version} is not supported (4 or 5)")
        if key_type != 2 or tee_type != 0x81:
            raise AttestationError(f"not an ECDSA-256 TDX quote (key type {key_type}, TEE type {tee_type:#x})")
        if version == 4:
            body_off, body_len = HEADER, TD10_BODY
        else:
            body_type, body_len = struct.unpack("<HI", raw[HEADER:HEADER + 6])
            if (body_type, body_len) not in ((2, TD10_BODY), (3, TD15_BODY)):
                raise AttestationError(f"unknown TDX v5 body type {body_type} of {body_len} bytes")
            body_off = HEADER + 6
        sig_off = body_off + body_len
        (sig_len,) = struct.unpack("<I", raw[sig_off:sig_off + 4])
        sd = raw[sig_off + 4: sig_off + 4 + sig_len]
        if len(sd) != sig_len or sig_len < 134:
            raise AttestationError("TDX quote is truncated (signature data)")
        signature, att_key = sd[:64], sd[64:128]
        cert_type, cert_len = struct.unpack("<HI", sd[128:134])
        if cert_type != 6:
            raise AttestationError(f"certification data type {cert_type} is not a QE report (6)")
        cd = sd[134:134 + cert_len]
        qe_report, qe_sig = cd[:QE_REPORT], cd[QE_REPORT:QE_REPORT + 64]
        (auth_len,) = struct.unpack("<H", cd[QE_REPORT + 64:QE_REPORT + 66])
        off = QE_REPORT + 66
        auth = cd[off:off + auth_len]
        inner_type, inner_len = struct.unpack("<HI", cd[off + auth_len:off + auth_len + 6])
        if inner_type != 5:
            raise AttestationError(f"QE certification data type {inner_type} is not a PCK chain (5)")
        chain = cd[off + auth_len + 6: off + auth_len + 6 + inner_len]
        if len(chain) != inner_len or len(qe_report) != QE_REPORT or len(auth) != auth_len:
            raise AttestationError("TDX quote is truncated (certification data)")
    except struct.error:
        raise AttestationError("TDX quote is truncated or malformed") from None
    return TdxQuote(version, raw[body_off:body_off + body_len], raw[:sig_off], signature, att_key, qe_report,
                    qe_sig, auth, chain.rstrip(b"\0"))


def _p256(raw64: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw64)
    except ValueError:
        raise AttestationError("attestation key is not a valid P-256 point") from None


def _verify_rs(key: ec.EllipticCurvePublicKey, sig64: bytes, data: bytes, what: str) -> None:
    r, s = int.from_bytes(sig64[:32], "big"), int.from_bytes(sig64[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(f"{what} does not verify") from None


def _subject(cert: x509.Certificate) -> str:
    """The subject for an error message; a damaged certificate's name may not even parse."""
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "<unparseable subject>"


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo, as pinned in :data:`INTEL_ROOT_PINS`."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@dataclass(frozen=True)
class TdxClaims:
    """What a verified TDX quote says (hex strings)."""

    version: int
    mrtd: str
    rtmrs: list[str]
    report_data: str
    mrconfigid: str
    mrowner: str
    td_attributes: str
    root: str


def verify(raw: bytes, *, pins: dict[str, str] | None = None, at_time: _dt.datetime | None = None,
           expected_report_data: bytes | None = None, allowed_mrtd: Iterable[str] | None = None) -> TdxClaims:
    """Verify end to end; returns the claims or raises AttestationError (also for damaged certificates, whose
    fields may fail to parse only when read).
    """
    try:
        return _verify(raw, pins=pins, at_time=at_time, expected_report_data=expected_report_data,
                       allowed_mrtd=allowed_mrtd)
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise AttestationError(f"malformed evidence or certificate ({type(e).__name__}: {e})") from None


def _verify(raw: bytes, *, pins: dict[str, str] | None = None, at_time: _dt.datetime | None = None,
           expected_report_data: bytes | None = None, allowed_mrtd: Iterable[str] | None = None) -> TdxClaims:
    """Verify a TDX quote end to end against pinned root keys; returns its claims."""
    at = at_time or _dt.datetime.now(_dt.UTC)
    q = parse_quote(raw)
    _verify_rs(_p256(q.attestation_key), q.signature, q.signed, "quote signature (attestation key)")
    binding = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report[320:384] != binding:
        raise AttestationError("attestation key is not bound into the QE report (REPORTDATA mismatch)")
    try:
        certs = x509.load_pem_x509_certificates(q.pck_chain_pem)
    except ValueError as e:
        raise AttestationError(f"PCK certificate chain does not parse ({e})") from None
    if len(certs) < 2:
        raise AttestationError("PCK certificate chain is incomplete")
    pck, root = certs[0], certs[-1]
    try:
        pck_key = pck.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise AttestationError(f"the PCK certificate's public key does not parse ({e})") from None
    if not isinstance(pck_key, ec.EllipticCurvePublicKey):
        raise AttestationError("PCK key is not ECDSA")
    _verify_rs(pck_key, q.qe_report_signature, q.qe_report, "QE report signature (PCK key)")
    for child, issuer in zip(certs, certs[1:] + [root], strict=True):
        try:
            child.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as e:
            raise AttestationError(f"certificate {_subject(child)} is not signed by {_subject(issuer)} "
                                   f"({type(e).__name__}: {e})") from None
        check_validity(child, at, f"certificate {_subject(child)}")
    name = (INTEL_ROOT_PINS if pins is None else pins).get(spki_sha256(root))
    if name is None:
        raise AttestationError("the PCK chain does not end in a pinned Intel root key")
    if expected_report_data is not None and q.report_data != expected_report_data:
        raise AttestationError("REPORTDATA does not match the challenge (stale, replayed or unbound evidence)")
    mrtd = q.mrtd.hex()
    if allowed_mrtd is not None and mrtd not in set(allowed_mrtd):
        raise AttestationError(f"MRTD {mrtd[:16]}... is not in the policy's allow-list")
    return TdxClaims(q.version, mrtd, [r.hex() for r in q.rtmrs], q.report_data.hex(), q.field(184, 48).hex(),
                     q.field(232, 48).hex(), q.field(120, 8).hex(), name)


# ---------------------------------------------------------------------------- registry entry points
def verify_evidence(evidence: Evidence, request: VerifyRequest) -> Claims:
    """The registered verifier: :func:`verify` on the evidence's quote, with the policy's MRTD allow-list."""
    c = verify(evidence.blob, at_time=request.at, expected_report_data=request.expected_report_data,
               allowed_mrtd=request.allowed_measurements)
    return Claims("tdx", c.mrtd, c.report_data, evidence.provider,
                  {"version": c.version, "rtmrs": c.rtmrs, "mrconfigid": c.mrconfigid, "mrowner": c.mrowner,
                   "td_attributes": c.td_attributes, "root": c.root})


def _certs(pem: bytes) -> list[dict[str, str]]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []
    return [{"subject": c.subject.rfc4514_string(), "not_before": c.not_valid_before_utc.isoformat(),
             "not_after": c.not_valid_after_utc.isoformat()} for c in certs]


def describe(evidence: Evidence) -> dict[str, Any]:
    """The quote's fields for ``fedsecure attest inspect`` (parsed, not verified)."""
    q = parse_quote(evidence.blob)
    return dict(version=q.version, mrtd=q.mrtd.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(q.rtmrs)},
                mrconfigid=q.field(184, 48).hex(), mrowner=q.field(232, 48).hex(),
                mrownerconfig=q.field(280, 48).hex(), td_attributes=q.field(120, 8).hex(),
                xfam=q.field(128, 8).hex(), report_data=q.report_data.hex(), pck_chain=_certs(q.pck_chain_pem))


def _recognize(data: bytes) -> bool:
    if len(data) < HEADER:
        return False
    version, _, tee_type = struct.unpack_from("<HHI", data, 0)
    return version in (4, 5) and tee_type == 0x81


def register() -> None:
    """Register the ``tdx`` TEE (facts, verifier, describer)."""
    register_tee(TeeInfo("tdx", "Intel TDX quote (v4/v5), PCK chain to the pinned Intel SGX Root CA; pins MRTD",
                         measurement_hex=96, raw_format="a TDX quote (v4/v5)", recognize=_recognize))
    register_verifier("tdx", verify_evidence, describe=describe)
