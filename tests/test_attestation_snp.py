"""AMD SEV-SNP verification against genuine evidence (tests/data/attestation), and forgeries of it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from fedsecure.attestation.tee.sevsnp import SIGNED_END, _spki_sha256, parse_report, verify
from fedsecure.errors import AttestationError

DATA = Path(__file__).resolve().parent / "data" / "attestation"  # genuine evidence, provenance in README.md
AT = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)

# AMD's genuine VCEK has a non-positive serial number; cryptography warns (and may refuse it one day)
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number")


def _genuine():
    return ((DATA / "snp_attestation.bin").read_bytes(), (DATA / "snp_vcek.testcer").read_bytes(),
            (DATA / "snp_milan.testcer").read_bytes())


def test_genuine_report_verifies_with_its_claims():
    report, vcek, chain = _genuine()
    claims = verify(report, vcek, chain, at_time=AT, expected_report_data=bytes([1, 2, 3, 4, 5]) + bytes(59))
    assert claims.root == "ARK-Milan"
    assert claims.tcb == {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}
    assert claims.measurement.startswith("b07af9620f3b839b") and len(claims.measurement) == 96
    assert verify(report, vcek, chain, at_time=AT, allowed_measurements=[claims.measurement]).vmpl == 0


@pytest.mark.parametrize("offset", [0x00, 0x50, 0x90, 0xC0, 0x180, 0x1A0, SIGNED_END - 1, SIGNED_END, SIGNED_END + 80])
def test_any_altered_byte_breaks_the_signature(offset):
    report, vcek, chain = _genuine()
    bad = bytearray(report)
    bad[offset] ^= 0x01
    with pytest.raises(AttestationError):
        verify(bytes(bad), vcek, chain, at_time=AT)


def test_challenge_and_measurement_policy():
    report, vcek, chain = _genuine()
    with pytest.raises(AttestationError, match="REPORT_DATA does not match the challenge"):
        verify(report, vcek, chain, at_time=AT, expected_report_data=bytes(64))
    with pytest.raises(AttestationError, match="not in the policy's allow-list"):
        verify(report, vcek, chain, at_time=AT, allowed_measurements=["00" * 48])


def test_validity_window_is_checked_at_the_given_time():
    report, vcek, chain = _genuine()
    with pytest.raises(AttestationError, match="VCEK: certificate is not valid before 2022-09-24"):
        verify(report, vcek, chain, at_time=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(AttestationError, match="ARK: certificate expired on 2045-10-22.*pass the time it was made"):
        verify(report, vcek, chain, at_time=dt.datetime(2046, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(AttestationError, match="VCEK: certificate expired on 2029-09-24"):
        verify(report, vcek, chain, at_time=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


def test_malformed_inputs():
    report, vcek, chain = _genuine()
    with pytest.raises(AttestationError, match="must be 1184 bytes"):
        verify(report[:-1], vcek, chain, at_time=AT)
    with pytest.raises(AttestationError, match="cannot parse"):
        verify(report, b"not a certificate", chain, at_time=AT)
    with pytest.raises(AttestationError, match="ASK and the ARK"):
        verify(report, vcek, chain.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n",
               at_time=AT)


# --------------------------------------------------------------------------- forgeries
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pss_cert(subject: str, issuer: str, pub, signer, extensions=()) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
         .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC)))
    for oid, value in extensions:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return b.sign(signer, hashes.SHA384(),
                  rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48))


def _forged_chain(report: bytes):
    """A complete look-alike chain and a report signed by a forged VCEK with matching extensions."""
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    genuine = x509.load_der_x509_certificate(_genuine()[1])
    exts = [(e.oid.dotted_string, e.value.value) for e in genuine.extensions
            if e.oid.dotted_string.startswith("1.3.6.1.4.1.3704")]
    ark = _pss_cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
    ask = _pss_cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
    vcek = _pss_cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, exts)
    signed = report[:SIGNED_END]
    r, s = decode_dss_signature(vcek_key.sign(signed, ec.ECDSA(hashes.SHA384())))
    forged = signed + r.to_bytes(72, "little") + s.to_bytes(72, "little") + report[SIGNED_END + 144:]
    chain = ask.public_bytes(serialization.Encoding.PEM) + ark.public_bytes(serialization.Encoding.PEM)
    return forged, vcek.public_bytes(serialization.Encoding.DER), chain, ark


def test_a_self_made_chain_is_refused_by_the_pinned_root():
    report, _, _ = _genuine()
    forged, vcek, chain, ark = _forged_chain(report)
    with pytest.raises(AttestationError, match="not a pinned AMD root"):
        verify(forged, vcek, chain, at_time=AT)
    # the pin is what stops it: pin the forger's root and every other check passes
    assert verify(forged, vcek, chain, at_time=AT, pins={_spki_sha256(ark): "forged"}).root == "forged"


def test_a_forged_vcek_under_the_genuine_chain_is_refused():
    report, _, chain = _genuine()
    forged, vcek, _, _ = _forged_chain(report)
    with pytest.raises(AttestationError, match="VCEK: certificate signature does not verify"):
        verify(forged, vcek, chain, at_time=AT)


def test_parse_report_fields():
    report = parse_report(_genuine()[0])
    assert report.version >= 2 and report.signature_algo == 1
    assert report.chip_id.hex().startswith("3ac3fe21")


def test_one_changed_bit_in_a_certificate_fails():
    report, vcek, chain = _genuine()
    for pos in (len(vcek) - 5, len(vcek) // 2):  # VCEK signature, VCEK signed part
        bad = bytearray(vcek)
        bad[pos] ^= 0x01
        with pytest.raises(AttestationError):
            verify(report, bytes(bad), chain, at_time=AT)
    second = chain.index(b"-----BEGIN CERTIFICATE-----", 10)  # the ARK, after the ASK
    for pos in (200, second + 600):
        bad = bytearray(chain)
        bad[pos] ^= 0x01
        with pytest.raises(AttestationError):
            verify(report, vcek, bytes(bad), at_time=AT)


def test_damage_anywhere_in_the_certificates_is_an_attestation_error():
    """No altered byte of the VCEK or the chain may escape as anything but AttestationError."""
    report, vcek, chain = _genuine()
    for pos in range(0, len(vcek), 11):
        bad = bytearray(vcek)
        bad[pos] ^= 0x04
        try:
            verify(report, bytes(bad), chain, at_time=AT)
        except AttestationError:
            pass
    for pos in range(0, len(chain), 17):
        bad = bytearray(chain)
        bad[pos] ^= 0x01
        try:
            verify(report, vcek, bytes(bad), at_time=AT)
        except AttestationError:
            pass
