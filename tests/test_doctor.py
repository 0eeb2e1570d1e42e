"""``fedsecure doctor``: the pre-flight check finds what would stop or endanger a deployment, and changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.launch.doctor import run_checks

from .test_deployment import Deployment

runner = CliRunner()


def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_on_a_fresh_consortium_then_on_broken_files(tmp_path):
    d = Deployment(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["config"].status == "OK" and site["SuperNode key"].status == "OK"
    assert site["consortium CA"].status == "OK" and site["telemetry"].status == "OK"
    assert site["keyring"].status == "WARN" and "first start" in site["keyring"].detail
    assert site["attestation"].status == "WARN" and "development only" in site["attestation"].detail
    assert site["coordinator"].status == "WARN"  # not started
    coord = _by_name(run_checks(tmp_path / "coordinator.yaml"))
    assert all(c.status == "OK" for c in coord.values()), coord
    res = runner.invoke(app, ["doctor", "-c", str(tmp_path / "site-0.yaml")])
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created

    key = tmp_path / "certs" / "sites" / "site-0" / "auth.key"
    os.chmod(key, 0o644)
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["SuperNode key"].status == "FAIL" and "chmod 600" in site["SuperNode key"].detail
    res = runner.invoke(app, ["doctor", "-c", str(tmp_path / "site-0.yaml")])
    assert res.exit_code == 1 and "FAIL" in res.output
    os.chmod(key, 0o600)
    good = key.read_bytes()
    key.write_bytes(b"not a key")
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["SuperNode key"].status == "FAIL" and "not an OpenSSH private key" in site["SuperNode key"].detail
    key.write_bytes(good)

    (tmp_path / "certs" / "coordinator.pem").write_text("not a certificate")
    coord = _by_name(run_checks(tmp_path / "coordinator.yaml"))
    assert coord["coordinator certificate"].status == "FAIL"
    assert run_checks(tmp_path / "missing.yaml")[0].status == "FAIL"
    assert d.port  # the deployment's port was never bound by the doctor


def test_doctor_finds_a_tampered_ledger(tmp_path):
    from fedsecure.crypto import generate_keyring
    from fedsecure.crypto.keys import write_keyring_file
    from fedsecure.privacy.accounting import Spend, epsilon_of
    from fedsecure.privacy.ledger import PrivacyLedger
    from fedsecure.store.files import StateFiles

    Deployment(tmp_path)
    state = tmp_path / "state" / "site-0"
    ring = generate_keyring()
    write_keyring_file(tmp_path / "state" / "keys" / "site-0.keyring.json", ring)
    led = PrivacyLedger.open(state, "e" * 64, files=StateFiles(ring))
    led.append(run_id="r", server_round=1, spend=Spend(1.0, 0.1, 10), delta=1e-5, accountant="prv",
               max_grad_norm=1.0, epsilon_after=epsilon_of([Spend(1.0, 0.1, 10)], 1e-5), epsilon_budget=3.0)
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["ledger"].status == "OK" and site["keyring"].status == "OK"
    f = next(Path(state).glob("privacy-ledger-*"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["ledger"].status == "FAIL"


def test_doctor_checks_the_secure_aggregation_roster(tmp_path):
    import yaml
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedsecure.secagg.roster import write_roster

    Deployment(tmp_path)
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["secure aggregation"].status == "OK" and "no roster" in site["secure aggregation"].detail
    lines = []
    for name in ("site-0", "site-1"):
        res = runner.invoke(app, ["attest", "node-key", "--config", str(tmp_path / f"{name}.yaml")])
        assert res.exit_code == 0, res.output
        lines.append(res.output.strip())
    res = runner.invoke(app, ["attest", "roster", "--out", str(tmp_path / "roster.yaml"), *lines])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load((tmp_path / "site-0.yaml").read_text())
    doc["site"]["secagg_roster"] = "roster.yaml"
    (tmp_path / "site-0.yaml").write_text(yaml.safe_dump(doc))
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["secure aggregation"].status == "OK" and "node key matches" in site["secure aggregation"].detail
    other = write_roster(tmp_path / "wrong.yaml", {"site-0": Ed25519PrivateKey.generate().public_key()})
    doc["site"]["secagg_roster"] = str(other)
    (tmp_path / "site-0.yaml").write_text(yaml.safe_dump(doc))
    site = _by_name(run_checks(tmp_path / "site-0.yaml"))
    assert site["secure aggregation"].status == "FAIL" and "would exclude it" in site["secure aggregation"].detail
    assert runner.invoke(app, ["attest", "roster", "--out", str(tmp_path / "bad.yaml"), "site-0=zz"]).exit_code == 2

    coord = yaml.safe_load((tmp_path / "coordinator.yaml").read_text())
    coord["federation"]["secure_aggregation"] = {"enabled": True, "roster": "wrong.yaml"}
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(coord))
    checks = _by_name(run_checks(tmp_path / "coordinator.yaml"))
    assert checks["secure aggregation"].status == "FAIL" and "site-1" in checks["secure aggregation"].detail
    coord["federation"]["secure_aggregation"]["roster"] = "roster.yaml"
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(coord))
    assert _by_name(run_checks(tmp_path / "coordinator.yaml"))["secure aggregation"].status == "OK"
