"""The attestation round protocol: nonces accepted once, binding to node key, DP settings and code, the
policy, the audit log, and the providers (software, configfs-tsm, command, NVIDIA GPU)."""

from __future__ import annotations

import ast
import datetime as dt
import json
import pathlib
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedsecure.attestation
from fedsecure import config
from fedsecure.attestation import base
from fedsecure.attestation.evidence import Evidence, code_hash, detect, report_data
from fedsecure.attestation.inspect import describe
from fedsecure.attestation.policy import MinDP, Policy, load_policy, policy_from_mapping
from fedsecure.attestation.protocol import AttestationGate, dp_config_document, site_statement
from fedsecure.attestation.providers import (
    CommandProvider,
    ConfigfsTsmProvider,
    NvidiaGpuProvider,
    SoftwareProvider,
    load_or_create_ed25519,
    make_provider,
)
from fedsecure.attestation.verify import SoftwareAttestationWarning, verify
from fedsecure.audit import AuditLog, verify_log
from fedsecure.errors import AttestationError, ConfigError, IntegrityError

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")

DATA = Path(__file__).resolve().parent / "data" / "attestation"  # genuine evidence, provenance in README.md
V4_AT = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)
DP = dp_config_document(enabled=True, epsilon_budget=3.0, delta=1e-5, sigma=0.9, q=0.1, steps=16, max_grad_norm=1.0,
                        noise="os-csprng")


def _policy(**kw) -> Policy:
    base = dict(measurements={"software": (code_hash(),)}, code=(code_hash(),),
                min_dp=MinDP(epsilon_budget=3.0, delta=1e-5, min_sigma=0.5), max_evidence_age_s=600.0)
    base.update(kw)
    return Policy(**base)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def site(tmp_path):
    """A site's provider and node key, and a gate with a controllable clock."""
    provider = SoftwareProvider(tmp_path / "site" / "signer.pem")
    key = load_or_create_ed25519(tmp_path / "site" / "node-key.pem")
    return provider, key


def _gate(tmp_path, policy: Policy | None = None, clock: Clock | None = None) -> AttestationGate:
    return AttestationGate(policy or _policy(), AuditLog(tmp_path / "audit.log"), clock=clock or Clock())


def _events(tmp_path) -> list[dict]:
    return AuditLog(tmp_path / "audit.log").entries()


# ---------------------------------------------------------------------------- the protocol
def test_honest_statement_is_accepted_and_audited(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    claims = gate.check(7, "site-a", 1, site_statement(provider, key, nonce, DP, b"update"), b"update",
                        {"sigma": 0.9, "epsilon_budget": 3.0, "delta": 1e-5})
    assert claims.tee == "software" and claims.measurement == code_hash()
    events = [e["event"] for e in _events(tmp_path)]
    assert events == ["attestation.policy", "attestation.nonce-issued", "attestation.accepted"]
    assert nonce.hex() not in (tmp_path / "audit.log").read_text()  # digests only


def test_replayed_nonce_is_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    st = site_statement(provider, key, nonce, DP, b"u")
    gate.check(7, "site-a", 1, st, b"u")
    with pytest.raises(AttestationError, match="already used: replayed"):
        gate.check(7, "site-a", 1, st, b"u")
    gate.challenge(7, "site-a", 2)  # a new round does not revive the old nonce
    with pytest.raises(AttestationError, match="already used"):
        gate.check(7, "site-a", 2, st, b"u")
    assert _events(tmp_path)[-1]["event"] == "attestation.rejected"


def test_expired_nonce_of_an_earlier_round_is_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    gate.close_round(1)  # the site never answered round 1
    with pytest.raises(AttestationError, match="already used"):
        gate.check(7, "site-a", 2, site_statement(provider, key, nonce, DP, b"u"), b"u")


def test_nonce_issued_to_another_site_is_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    theirs = gate.challenge(8, "site-b", 1)
    gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match=r"issued to another site \(site-b\)"):
        gate.check(7, "site-a", 1, site_statement(provider, key, theirs, DP, b"u"), b"u")
    with pytest.raises(AttestationError, match="not issued by this coordinator"):
        gate.check(7, "site-a", 1, site_statement(provider, key, bytes(32), DP, b"u"), b"u")


def test_evidence_bound_to_another_node_key_is_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    honest = site_statement(provider, key, nonce, DP, b"u")
    other = Ed25519PrivateKey.generate()
    forged = dict(site_statement(provider, other, nonce, DP, b"u"), evidence=honest["evidence"])
    with pytest.raises(AttestationError, match="REPORT_DATA does not match"):
        gate.check(7, "site-a", 1, forged, b"u")


def test_update_not_signed_by_the_attested_key_is_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="not signed by the attested node key"):
        gate.check(7, "site-a", 1, site_statement(provider, key, nonce, DP, b"update"), b"altered update")


def test_node_key_may_not_change_within_a_run(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    n1 = gate.challenge(7, "site-a", 1)
    gate.check(7, "site-a", 1, site_statement(provider, key, n1, DP, b"u"), b"u")
    n2 = gate.challenge(7, "site-a", 2)
    with pytest.raises(AttestationError, match="node key differs"):
        gate.check(7, "site-a", 2, site_statement(provider, Ed25519PrivateKey.generate(), n2, DP, b"u"), b"u")


@pytest.mark.parametrize(("change", "match"), [
    ({"sigma": 0.3}, "weaker than the policy: sigma=0.3 breaks min_dp.min_sigma=0.5"),
    ({"epsilon_budget": 8.0}, "epsilon_budget=8 breaks min_dp.epsilon_budget=3"),
    ({"delta": 1e-3}, "delta=0.001 breaks min_dp.delta=1e-05"),
    ({"enabled": False}, "differential privacy off"),
    ({"noise": "seeded"}, "draws its noise from 'seeded', not the operating system's secure generator"),
    ({"noise": None}, "draws its noise from None"),
])
def test_dp_configuration_weaker_than_policy_is_rejected(tmp_path, site, change, match):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    dp = dp_config_document(**{**json.loads(DP), **change})
    with pytest.raises(AttestationError, match=match):
        gate.check(7, "site-a", 1, site_statement(provider, key, nonce, dp, b"u"), b"u")


def test_reported_numbers_must_match_the_attested_ones(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    nonce = gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="reported sigma=2 differs from the attested sigma=0.9"):
        gate.check(7, "site-a", 1, site_statement(provider, key, nonce, DP, b"u"), b"u", {"sigma": 2.0})
    # the FedAvg weight is the attested number of records: a reply that claims more, or attests none, fails
    dp = dp_config_document(**{**json.loads(DP), "records": 96})
    nonce = gate.challenge(7, "site-a", 2)
    with pytest.raises(AttestationError, match="reported records=1e\\+30 differs from the attested records=96"):
        gate.check(7, "site-a", 2, site_statement(provider, key, nonce, dp, b"u"), b"u", {"records": 1e30})
    nonce = gate.challenge(7, "site-a", 3)
    with pytest.raises(AttestationError, match="reports records=96 but the attested DP configuration has no"):
        gate.check(7, "site-a", 3, site_statement(provider, key, nonce, DP, b"u"), b"u", {"records": 96})


def test_measurement_not_on_the_list_and_unapproved_code_are_rejected(tmp_path, site):
    _, key = site
    gate = _gate(tmp_path)
    rogue = SoftwareProvider(tmp_path / "rogue.pem", measurement="ab" * 32)
    nonce = gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="measurement abababab.* not in the policy's allow-list"):
        gate.check(7, "site-a", 1, site_statement(rogue, key, nonce, DP, b"u"), b"u")
    gate2 = _gate(tmp_path / "2", _policy(code=("cd" * 32,)))
    n2 = gate2.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="not an approved build"):
        gate2.check(7, "site-a", 1, site_statement(site[0], key, n2, DP, b"u"), b"u")


def test_missing_or_malformed_statements_are_rejected(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path)
    gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="sent no attestation evidence"):
        gate.check(7, "site-a", 1, None, b"u")
    nonce = gate.challenge(7, "site-a", 1)
    st = site_statement(provider, key, nonce, DP, b"u")
    with pytest.raises(AttestationError, match="lacks evidence"):
        gate.check(7, "site-a", 1, {k: v for k, v in st.items() if k != "evidence"}, b"u")
    with pytest.raises(AttestationError, match="wrong types"):
        gate.check(7, "site-a", 1, {**st, "nonce": "text"}, b"u")
    bad = bytearray(st["evidence"])
    bad[bad.index(b'"blob":"') + 20] ^= 0x01  # one changed character of the signed statement
    with pytest.raises(AttestationError):
        gate.check(7, "site-a", 1, {**st, "evidence": bytes(bad)}, b"u")


def test_evidence_older_than_the_policy_allows_is_rejected(tmp_path, site):
    provider, key = site
    clock = Clock()
    gate = _gate(tmp_path, _policy(max_evidence_age_s=60.0), clock)
    nonce = gate.challenge(7, "site-a", 1)
    clock.t += 61
    with pytest.raises(AttestationError, match="61 s after the nonce, over the policy's max_evidence_age_s=60"):
        gate.check(7, "site-a", 1, site_statement(provider, key, nonce, DP, b"u"), b"u")


def test_policy_without_the_tee_type_refuses_it(tmp_path, site):
    provider, key = site
    gate = _gate(tmp_path, _policy(measurements={"tdx": ("00" * 48,)}))
    nonce = gate.challenge(7, "site-a", 1)
    with pytest.raises(AttestationError, match="accepts no software evidence"):
        gate.check(7, "site-a", 1, site_statement(provider, key, nonce, DP, b"u"), b"u")


# ---------------------------------------------------------------------------- genuine evidence via the interface
def test_tdx_quote_through_the_verifier_interface():
    raw = (DATA / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    ev = detect(raw)
    assert ev.tee == "tdx"
    rd = bytes.fromhex(verify(ev, None, None, V4_AT).report_data)
    mrtd = "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
    claims = verify(ev, rd, _policy(measurements={"tdx": (mrtd,)}), V4_AT)
    assert claims.measurement == mrtd and claims.details["root"] == "Intel SGX Root CA"
    with pytest.raises(AttestationError, match="MRTD 6363b8043668a3ad.* not in the policy's allow-list"):
        verify(ev, rd, _policy(measurements={"tdx": ("00" * 48,)}), V4_AT)
    with pytest.raises(AttestationError, match="REPORTDATA does not match"):
        verify(ev, report_data(bytes(32), bytes(32), DP, code_hash()), None, V4_AT)


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_snp_report_with_a_vcek_cache(tmp_path):
    raw = (DATA / "snp_attestation.bin").read_bytes()
    ev = detect(raw)
    assert ev.tee == "sev-snp"
    at = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(AttestationError, match="no VCEK for chip 3ac3fe21e13fb099"):
        verify(ev, None, None, at)
    cache = tmp_path / "vcek"
    cache.mkdir()
    (cache / "cert_chain.pem").write_bytes((DATA / "snp_milan.testcer").read_bytes())
    with pytest.raises(AttestationError, match=r"3ac3fe21e13fb099.*\.der is missing"):
        verify(ev, None, None, at, vcek_dir=cache)
    chip = "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea464cdce40c" \
           "05f63c9b610c5068b006b5d"
    (cache / f"{chip}.der").write_bytes((DATA / "snp_vcek.testcer").read_bytes())
    meas = verify(ev, None, None, at, vcek_dir=cache).measurement
    policy = _policy(measurements={"sev-snp": (meas,)}, vcek_dir=str(cache))
    assert verify(ev, bytes([1, 2, 3, 4, 5]) + bytes(59), policy, at).details["chip_id"] == chip
    with pytest.raises(AttestationError, match="accepts no sev-snp evidence"):
        verify(ev, None, _policy(), at)


def test_detect_rejects_unknown_bytes():
    with pytest.raises(AttestationError, match="cannot tell what this evidence is"):
        detect(b"\x00" * 100)
    with pytest.raises(AttestationError, match="not JSON"):
        detect(b"{not json")
    with pytest.raises(AttestationError, match="over the 1048576-byte limit"):
        Evidence.from_bytes(b"{" + b" " * (1 << 20))
    with pytest.raises(AttestationError, match="TEE type 'sgx'"):
        Evidence.from_bytes(b'{"fedsecure-evidence":1,"tee":"sgx","blob":""}')


# ---------------------------------------------------------------------------- policy files
def test_policy_file_round_trip_and_errors(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(_policy(vcek_dir="vcek").to_yaml())
    loaded = load_policy(p)
    assert loaded.code == (code_hash(),) and loaded.min_dp == MinDP(3.0, 1e-5, 0.5)
    assert loaded.vcek_dir == str(tmp_path / "vcek")  # relative to the policy file
    cases = [
        ("measurements: {software: ['zz']}\ncode: ['" + "a" * 64 + "']", "measurements.software: 'zz' is not hex"),
        ("measurements: {sgx: []}\ncode: []", "measurements.sgx: unknown TEE type"),
        ("measurements: {tdx: ['ab']}\ncode: []", "has 2 hex digits, 96 expected"),
        ("measurements: {tdx: []}\ncode: []", "is empty, so no evidence of this type could pass"),
        ("measurements: {software: ['" + "a" * 64 + "']}\ncode: []", "code: must list at least one"),
        ("measurements: {software: ['" + "a" * 64 + "']}\ncode: ['" + "a" * 64 + "']\non_failure: shrug",
         "on_failure: 'shrug' is not an action"),
        ("measurements: {software: ['" + "a" * 64 + "']}\ncode: ['" + "a" * 64 + "']\nmin_dp: {epsilon_budget: -1}",
         "min_dp.epsilon_budget: -1 is not a positive number"),
        ("allowed: {}", "allowed: unknown key"),
        ("measurements: {software: ['" + "a" * 64 + "']}\ncode: [" + "1" * 64 + "]", "quote each value"),
        ("measurements: [", "not valid YAML"),
    ]
    for text, match in cases:
        p.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_policy(p)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_policy(tmp_path / "absent.yaml")
    example = load_policy(Path(__file__).resolve().parents[1] / "configs" / "attestation-policy.example.yaml")
    assert set(example.measurements) == {"tdx", "sev-snp"} and example.on_failure == "reject-update"


# ---------------------------------------------------------------------------- audit log
def test_audit_log_chain_detects_edits_deletions_and_torn_tails(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(4):
        log.append("test.event", i=i)
    assert verify_log(path) == (4, log.head)
    assert AuditLog(path).append("test.event", i=4) and verify_log(path)[0] == 5  # reopened: chain continues
    good = path.read_bytes()
    lines = good.splitlines(keepends=True)
    path.write_bytes(good.replace(b'"i":2', b'"i":9'))
    with pytest.raises(IntegrityError, match=r"audit.log:3: the entry's hash does not match"):
        verify_log(path)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(IntegrityError, match=r":3: sequence number 4 where 3 was expected"):
        AuditLog(path)
    path.write_bytes(good[:-10])
    with pytest.raises(IntegrityError, match="last line is incomplete"):
        AuditLog(path)
    path.write_bytes(good)
    assert verify_log(path)[0] == 5


# ---------------------------------------------------------------------------- providers
def test_software_provider_warns_and_keeps_its_key_private(tmp_path):
    key_path = tmp_path / "s" / "signer.pem"
    with pytest.warns(SoftwareAttestationWarning, match="development only"):
        ev = SoftwareProvider(key_path).evidence(bytes(64))
    assert key_path.stat().st_mode & 0o777 == 0o600
    again = SoftwareProvider(key_path).evidence(bytes(64))
    assert json.loads(ev.blob)["public_key"] == json.loads(again.blob)["public_key"]
    key_path.chmod(0o644)
    with pytest.raises(AttestationError, match="readable by group or others. Fix: chmod 600"):
        SoftwareProvider(key_path)
    with pytest.raises(AttestationError, match="must be 64 bytes"):
        SoftwareProvider(tmp_path / "t.pem").evidence(b"short")


@pytest.fixture
def fake_configfs(tmp_path, monkeypatch):
    """A directory that behaves like configfs-tsm: a new entry has 'provider' and 'generation'; writing
    'inblob' bumps the generation and produces 'outblob' (here: a genuine TDX quote)."""
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    state = {"backend": "tdx_guest", "quote": b"QUOTE", "extra_writes": 0, "entries": []}
    real_mkdir, real_write = pathlib.Path.mkdir, pathlib.Path.write_bytes

    def mkdir(self, *a, **k):
        real_mkdir(self, *a, **k)
        if self.parent == root:
            state["entries"].append(self)
            (self / "provider").write_text(state["backend"] + "\n")
            (self / "generation").write_text("0\n")

    def write_bytes(self, data):
        n = real_write(self, data)
        if self.name == "inblob" and self.parent.parent == root:
            gen = 1 + state["extra_writes"]
            (self.parent / "generation").write_text(f"{gen}\n")
            real_write(self.parent / "outblob", state["quote"] + data)
        return n

    real_rmdir = pathlib.Path.rmdir

    def rmdir(self):
        if self.parent == root:  # configfs removes an entry's attributes with it
            for f in self.iterdir():
                f.unlink()
        real_rmdir(self)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    monkeypatch.setattr(pathlib.Path, "rmdir", rmdir)
    return root, state


def test_configfs_tsm_provider(fake_configfs, tmp_path):
    root, state = fake_configfs
    rd = bytes(range(64))
    ev = ConfigfsTsmProvider("tdx", root).evidence(rd)
    assert ev.tee == "tdx" and ev.provider == "configfs-tsm" and ev.blob == b"QUOTE" + rd
    assert not list(root.iterdir())  # the report entry was removed
    with pytest.raises(AttestationError, match="backed by 'tdx_guest', not 'sev_guest'"):
        ConfigfsTsmProvider("sev-snp", root).evidence(rd)
    state["extra_writes"] = 1
    with pytest.raises(AttestationError, match="generation moved from 0 to 2: another process"):
        ConfigfsTsmProvider("tdx", root).evidence(rd)
    with pytest.raises(AttestationError, match="offers no configfs-tsm"):
        ConfigfsTsmProvider("tdx", tmp_path / "absent").evidence(rd)


def test_command_provider(tmp_path):
    tool = tmp_path / "agent.py"
    tool.write_text("import sys, json, base64\n"
                    "rd = sys.argv[1]\n"
                    "if rd == 'fail': sys.exit('agent: no TPM')\n"
                    "blob = json.dumps({'rd': rd}).encode()\n"
                    "print(json.dumps({'fedsecure-evidence': 1, 'tee': 'software', 'provider': 'agent',"
                    " 'blob': base64.b64encode(blob).decode()}))\n")
    ev = CommandProvider([sys.executable, str(tool), "{report_data}"]).evidence(bytes([7]) * 64)
    assert ev.tee == "software" and json.loads(ev.blob)["rd"] == "07" * 64
    with pytest.raises(AttestationError, match="exited 1: agent: no TPM"):
        CommandProvider([sys.executable, str(tool), "fail"]).evidence(bytes(64))
    with pytest.raises(AttestationError, match="cannot tell what this evidence is"):
        CommandProvider([sys.executable, "-c", "print('hello')"]).evidence(bytes(64))
    with pytest.raises(AttestationError, match="not found"):
        CommandProvider([str(tmp_path / "absent")]).evidence(bytes(64))
    with pytest.raises(AttestationError, match="needs attestation.command"):
        CommandProvider([])


def test_nvidia_gpu_provider_without_the_sdk_says_so():
    try:
        import nv_attestation_sdk  # noqa: F401
        pytest.skip("NVIDIA's attestation SDK is installed here")
    except ImportError:
        pass
    with pytest.raises(AttestationError, match="needs NVIDIA's attestation SDK, which is not installed"):
        NvidiaGpuProvider().evidence(bytes(64))
    with pytest.raises(AttestationError, match="not installed"):
        verify(Evidence("nvidia-gpu", b"[]"), bytes(64), None)


# ---------------------------------------------------------------------------- the registry
def test_registered_providers_are_the_ones_the_config_accepts():
    from fedsecure.attestation import providers

    assert base.provider_names() == config.PROVIDERS
    assert providers.PROVIDERS == config.PROVIDERS


@pytest.fixture
def registry(monkeypatch):
    """A throwaway copy of the registry, holding the real registrations; what a test adds goes with it."""
    base.tee_names()  # the TEE modules have registered
    monkeypatch.setattr(base, "REGISTRY", base.REGISTRY.copy())
    return base.REGISTRY


class _ToyProvider:
    name = "toy"

    def evidence(self, report_data: bytes) -> Evidence:
        return Evidence("toy", b"TOY!" + report_data[:4], "toy")


def test_one_registration_reaches_the_policy_envelopes_verifier_and_inspect(registry, tmp_path):
    requests = []

    def verify_toy(ev: Evidence, request: base.VerifyRequest) -> base.Claims:
        requests.append(request)
        measurement = ev.blob[:4].hex()
        if request.allowed_measurements is not None and measurement not in request.allowed_measurements:
            raise AttestationError(f"toy measurement {measurement} is not allowed")
        return base.Claims("toy", measurement, ev.blob[4:].hex(), ev.provider)

    base.register_tee(base.TeeInfo("toy", "a TEE for this test", measurement_hex=8, raw_format="a toy blob",
                                   recognize=lambda data: data.startswith(b"TOY!")))
    base.register_verifier("toy", verify_toy, describe=lambda ev: {"toy_bytes": len(ev.blob)})
    base.register_provider("toy", lambda settings: _ToyProvider())
    with pytest.raises(ValueError, match="TEE 'toy' is already registered"):
        base.register_tee(base.TeeInfo("toy", "again"))
    assert "toy" in base.tee_names() and "toy" in base.provider_names()

    # the policy loader: the TEE type, and the length of its measurements
    policy = policy_from_mapping({"measurements": {"toy": ["544f5921"]}, "code": [code_hash()]})
    with pytest.raises(ConfigError, match="measurements.toy: ab... has 2 hex digits, 8 expected"):
        policy_from_mapping({"measurements": {"toy": ["ab"]}, "code": [code_hash()]})
    # envelopes and raw evidence
    ev = make_provider("toy", state_dir=tmp_path).evidence(bytes(range(64)))
    assert Evidence.from_bytes(ev.to_bytes()) == ev
    assert detect(b"TOY!\x01").tee == "toy"
    with pytest.raises(AttestationError, match=r"an SEV-SNP report \(1184 bytes\) or a toy blob"):
        detect(b"\x00" * 100)
    # the verifier dispatch, with the policy's allow-list for this TEE
    claims = verify(ev, None, policy, V4_AT)
    assert (claims.tee, claims.measurement, claims.report_data) == ("toy", "544f5921", "00010203")
    assert requests[-1].allowed_measurements == ("544f5921",) and requests[-1].at == V4_AT
    with pytest.raises(AttestationError, match="toy measurement 00000000 is not allowed"):
        verify(Evidence("toy", bytes(8)), None, policy, V4_AT)
    # inspect
    assert describe(ev) == {"tee": "toy", "provider": "toy", "size": 8, "toy_bytes": 8, "aux": []}


def test_an_unregistered_tee_is_refused_everywhere(registry):
    with pytest.raises(AttestationError, match="unknown TEE type 'toy'"):
        verify(Evidence("toy", b""), None, None)
    with pytest.raises(AttestationError, match="evidence TEE type 'toy' is not one of tdx, sev-snp, nvidia-gpu, "
                                               "software"):
        Evidence.from_bytes(Evidence("toy", b"").to_bytes())
    with pytest.raises(ConfigError, match="measurements.toy: unknown TEE type"):
        policy_from_mapping({"measurements": {"toy": ["00"]}, "code": [code_hash()]})
    with pytest.raises(AttestationError, match="unknown attestation provider 'toy'. Fix: use one of software, tdx"):
        make_provider("toy", state_dir=".")
    with pytest.raises(ValueError, match="register the facts of TEE 'toy'"):
        base.register_verifier("toy", lambda ev, request: base.Claims("toy", "", ""))


ATTESTATION = Path(fedsecure.attestation.__file__).resolve().parent
#: modules outside tee/ that belong to one side (tee/ modules are classified by what they register)
SITE = {"fedsecure.attestation.providers", "fedsecure.attestation.keys"}
COORDINATOR = {"fedsecure.attestation.verify", "fedsecure.attestation.policy", "fedsecure.attestation.inspect"}
SHARED = {"fedsecure.attestation.base", "fedsecure.attestation.evidence"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ATTESTATION.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _static_imports(path: Path, known: set[str]) -> set[str]:
    """The fedsecure.attestation modules ``path`` imports anywhere (function-level imports included)."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (prefix, node.module or "") if p)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _registers(path: Path) -> set[str]:
    calls = {getattr(n.func, "id", getattr(n.func, "attr", None)) for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call)}
    return {side for side, fn in (("site", "register_provider"), ("coordinator", "register_verifier")) if fn in calls}


def test_site_and_coordinator_modules_meet_only_in_base_and_evidence():
    paths = {_module_name(p): p for p in ATTESTATION.rglob("*.py")}
    imports = {m: _static_imports(p, set(paths)) for m, p in paths.items()}
    sides = {m: _registers(p) for m, p in paths.items() if ".tee." in m}
    sides |= {m: {"site"} for m in SITE} | {m: {"coordinator"} for m in COORDINATOR}
    site = {m for m, s in sides.items() if s == {"site"}}
    coordinator = {m for m, s in sides.items() if s == {"coordinator"}}
    tee = "fedsecure.attestation.tee."
    assert {tee + "configfs", tee + "command"} <= site and {tee + "tdx", tee + "sevsnp"} <= coordinator
    assert sides[tee + "software"] == sides[tee + "nvidia_gpu"] == {"site", "coordinator"}

    def reach(module: str) -> dict[str, list[str]]:
        """Every module ``module`` imports, directly or not, with one import chain to it."""
        chains, todo = {module: [module]}, [module]
        while todo:
            m = todo.pop()
            for n in sorted(imports.get(m, ())):
                if n not in chains:
                    chains[n] = chains[m] + [n]
                    todo.append(n)
        return chains

    for module in sorted(paths):
        chains = reach(module)
        if module in site:
            bad = coordinator & set(chains)
        elif module in coordinator:
            bad = site & set(chains)
        elif module in SHARED:
            bad = (site | coordinator | {m for m in sides if ".tee." in m}) & set(chains)
        else:
            bad = set()
        assert not bad, f"{module} imports the other side: {[' -> '.join(chains[b]) for b in sorted(bad)]}"
        if ".tee." in module:  # a TEE module uses the registry, never the dispatchers that read it
            dispatchers = COORDINATOR | {"fedsecure.attestation.protocol", "fedsecure.attestation.providers"}
            assert not (set(chains) & dispatchers), f"{module} imports {sorted(set(chains) & dispatchers)}"


# ---------------------------------------------------------------------------- CLI
def test_cli_attest_inspect_and_verify(tmp_path):
    from typer.testing import CliRunner

    from fedsecure.cli import app

    runner = CliRunner()
    quote = DATA / "tdx_prod_quote_SPR_E4.dat"
    res = runner.invoke(app, ["attest", "inspect", str(quote), "--json"])
    assert res.exit_code == 0, res.output
    fields = json.loads(res.output)
    assert fields["version"] == 4 and fields["mrtd"].startswith("6363b804") and len(fields["pck_chain"]) == 3
    assert "rtmr3" in runner.invoke(app, ["attest", "inspect", str(quote)]).output

    at = ["--at", "2023-07-01T01:00:00Z"]
    res = runner.invoke(app, ["attest", "verify", str(quote), *at, "--report-data", fields["report_data"]])
    assert res.exit_code == 0 and "OK: tdx evidence verified (signatures, certificate chain, report data)" in res.output
    bad = bytearray(quote.read_bytes())
    bad[48 + 136] ^= 1  # one bit of MRTD
    (tmp_path / "bad.dat").write_bytes(bytes(bad))
    res = runner.invoke(app, ["attest", "verify", str(tmp_path / "bad.dat"), *at])
    assert res.exit_code == 2 and "quote signature (attestation key) does not verify" in res.output
    res = runner.invoke(app, ["attest", "verify", str(quote), "--at", "2031-01-01"])
    assert res.exit_code == 2 and "expired on 2029-09-20" in res.output
    res = runner.invoke(app, ["attest", "verify", str(quote), *at, "--report-data", "00" * 64])
    assert res.exit_code == 2 and "REPORTDATA does not match" in res.output

    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(measurements={"tdx": (fields["mrtd"],)}).to_yaml())
    res = runner.invoke(app, ["attest", "verify", str(quote), *at, "--policy", str(policy)])
    assert res.exit_code == 0 and "TEE type and measurement (policy)" in res.output
    policy.write_text(_policy().to_yaml())
    res = runner.invoke(app, ["attest", "verify", str(quote), *at, "--policy", str(policy)])
    assert res.exit_code == 2 and "accepts no tdx evidence" in res.output
    res = runner.invoke(app, ["attest", "verify", str(quote), "--at", "yesterday"])
    assert res.exit_code == 2 and "not an ISO time" in res.output
    assert runner.invoke(app, ["attest", "code-hash"]).output.strip() == code_hash()


def test_cli_audit_verify(tmp_path):
    from typer.testing import CliRunner

    from fedsecure.cli import app

    log = AuditLog(tmp_path / "audit.log")
    log.append("a")
    log.append("b")
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "verify", str(tmp_path / "audit.log")])
    assert res.exit_code == 0 and f"OK: 2 entries, chain intact, head {log.head}" in res.output
    (tmp_path / "audit.log").write_text((tmp_path / "audit.log").read_text().replace('"event":"b"', '"event":"c"'))
    res = runner.invoke(app, ["audit", "verify", str(tmp_path / "audit.log")])
    assert res.exit_code == 2 and "audit.log:2: the entry's hash does not match" in res.output
