"""Intel TDX quote verification against genuine quotes (tests/data/attestation), and alterations of them."""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path

import pytest
from cryptography import x509

from fedsecure.attestation.tee.tdx import HEADER, TD10_BODY, parse_quote, verify
from fedsecure.errors import AttestationError

DATA = Path(__file__).resolve().parent / "data" / "attestation"  # genuine evidence, provenance in README.md

V4_AT = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)  # the time go-tdx-guest verifies this quote at


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _valid_time(raw: bytes) -> dt.datetime:
    pck = x509.load_pem_x509_certificates(parse_quote(raw).pck_chain_pem)[0]
    return pck.not_valid_before_utc + dt.timedelta(days=1)


@pytest.mark.parametrize(("name", "version"), [("tdx_prod_quote_SPR_E4.dat", 4), ("tdx_quote_v5_sample.dat", 5),
                                               ("tdx_cos-113-quote.dat", 4)])
def test_genuine_quotes_verify(name, version):
    raw = _read(name)
    at = V4_AT if name.startswith("tdx_prod") else _valid_time(raw)
    claims = verify(raw, at_time=at)
    assert claims.version == version and claims.root == "Intel SGX Root CA"
    assert len(claims.mrtd) == 96 and len(claims.rtmrs) == 4
    assert verify(raw, at_time=at, allowed_mrtd=[claims.mrtd]).mrtd == claims.mrtd


def test_report_data_carries_the_challenge():
    raw = _read("tdx_cos-113-quote.dat")
    nonce = _read("tdx_cos-113-nonce.dat")
    assert verify(raw, at_time=_valid_time(raw), expected_report_data=nonce).report_data == nonce.hex()
    with pytest.raises(AttestationError, match="REPORTDATA does not match the challenge"):
        verify(raw, at_time=_valid_time(raw), expected_report_data=bytes([nonce[0] ^ 1]) + nonce[1:])


@pytest.mark.parametrize(("offset", "needle"), [
    (8, "quote signature"),                               # header
    (HEADER + 136, "quote signature"),                    # MRTD
    (HEADER + 520, "quote signature"),                    # REPORTDATA
    (HEADER + TD10_BODY + 4 + 10, "quote signature"),     # the signature itself
    (HEADER + TD10_BODY + 4 + 64 + 5, "quote signature|not a valid P-256 point"),  # attestation key
    (HEADER + TD10_BODY + 4 + 134 + 20, "QE report signature|not bound"),           # QE report
    (HEADER + TD10_BODY + 4 + 134 + 384 + 3, "QE report signature"),               # QE report signature
])
def test_altered_quotes_fail_at_the_right_check(offset, needle):
    raw = bytearray(_read("tdx_prod_quote_SPR_E4.dat"))
    raw[offset] ^= 0x01
    with pytest.raises(AttestationError, match=needle):
        verify(bytes(raw), at_time=V4_AT)


def test_pinning_time_and_policy():
    raw = _read("tdx_prod_quote_SPR_E4.dat")
    with pytest.raises(AttestationError, match="pinned Intel root"):
        verify(raw, at_time=V4_AT, pins={"00" * 32: "someone else"})
    with pytest.raises(AttestationError, match="PCK Certificate: certificate expired on 2029-09-20"):
        verify(raw, at_time=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(AttestationError, match="not valid before 2022-09-20"):
        verify(raw, at_time=dt.datetime(2022, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(AttestationError, match="allow-list"):
        verify(raw, at_time=V4_AT, allowed_mrtd=["00" * 48])


def test_malformed_quotes():
    raw = _read("tdx_prod_quote_SPR_E4.dat")
    for cut in (0, 10, HEADER + 100, HEADER + TD10_BODY + 2, HEADER + TD10_BODY + 300, len(raw) - 500):
        with pytest.raises(AttestationError):
            verify(raw[:cut], at_time=V4_AT)
    wrong_version = struct.pack("<H", 3) + raw[2:]
    with pytest.raises(AttestationError, match="version 3 is not supported"):
        parse_quote(wrong_version)
    v5 = bytearray(_read("tdx_quote_v5_sample.dat"))
    v5[HEADER] = 9  # unknown body type
    with pytest.raises(AttestationError, match="unknown TDX v5 body type"):
        parse_quote(bytes(v5))


def test_one_changed_bit_in_a_certificate_of_the_pck_chain_fails():
    raw = _read("tdx_prod_quote_SPR_E4.dat")
    chain = parse_quote(raw).pck_chain_pem
    start = raw.index(chain)
    begins = [m for m in range(len(chain)) if chain.startswith(b"-----BEGIN CERTIFICATE-----", m)]
    assert len(begins) == 3  # PCK, platform CA, root
    for begin in begins:
        bad = bytearray(raw)
        bad[start + begin + 28 + 400] ^= 0x01  # one bit well inside the base64 body (the signed part)
        with pytest.raises(AttestationError, match="certificate|PCK|QE report signature"):
            verify(bytes(bad), at_time=V4_AT)


def test_damage_anywhere_in_the_quote_is_an_attestation_error():
    raw = _read("tdx_prod_quote_SPR_E4.dat")
    chain = parse_quote(raw).pck_chain_pem
    start = raw.index(chain)
    for pos in range(0, len(raw), 23):
        if pos >= start + len(chain):
            break  # bytes after the quote (this test file carries a trailing note) are not part of it
        if start <= pos and raw[pos] in b" \n\r\t":
            continue  # PEM ignores whitespace: the certificate is unchanged, and rightly still verifies
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(AttestationError):
            verify(bytes(bad), at_time=V4_AT)
