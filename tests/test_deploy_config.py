"""Deployment material and configs (fast): `fedsecure certs`, coordinator.yaml and site.yaml validation."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedsecure.attestation.policy import Policy
from fedsecure.cli import app
from fedsecure.data.synth import synthesize
from fedsecure.errors import ConfigError, KeyMaterialError
from fedsecure.launch.certs import init
from fedsecure.launch.deploy_config import load_coordinator_config, load_site_config, write_node_config


def test_certs_init_makes_a_ca_a_server_cert_and_site_keys(tmp_path):
    m = init(tmp_path / "c", ["coordinator.example.org", "127.0.0.1"], ["hospital-a", "hospital-b"])
    for key in (m.ca_key, m.server_key, *(priv for priv, _ in m.sites.values())):
        assert key.stat().st_mode & 0o777 == 0o600, key
    ca = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(m.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert srv.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    priv, pub = m.sites["hospital-a"]
    public = serialization.load_ssh_public_key(pub.read_bytes())  # as `flwr supernode register` reads it
    private = serialization.load_ssh_private_key(priv.read_bytes(), password=None)  # as flower-supernode does
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()


def test_certs_never_overwrite_without_force(tmp_path):
    m = init(tmp_path, ["localhost"], ["a"])
    before = m.server_key.read_bytes()
    with pytest.raises(KeyMaterialError, match="already exists.*pass --force"):
        init(tmp_path, ["localhost"], ["a"])
    assert m.server_key.read_bytes() == before
    init(tmp_path, ["localhost"], ["a"], force=True)
    assert m.server_key.read_bytes() != before
    with pytest.raises(ConfigError, match="site name"):
        init(tmp_path / "x", ["localhost"], ["bad name/.."])


def test_certs_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["certs", "init", "--out", str(tmp_path), "--site", "h1"])
    assert res.exit_code == 0 and "keep it offline" in res.output
    res = runner.invoke(app, ["certs", "init", "--out", str(tmp_path), "--site", "h1"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["certs", "add-site", "h2", "--out", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "sites" / "h2" / "auth.pub").exists()


@pytest.fixture
def consortium(tmp_path):
    init(tmp_path / "certs", ["localhost"], ["a", "b"])
    synthesize(tmp_path / "data", sites=1, records_per_site=10, eval_fraction=0.2, seed=1)
    coord = {"server": {"run_dir": "run", "port": 9999, "tls_ca": "certs/ca.pem", "tls_cert": "certs/coordinator.pem",
                        "tls_key": "certs/coordinator.key", "sites": {"a": "certs/sites/a/auth.pub",
                                                                      "b": "certs/sites/b/auth.pub"}},
             "federation": {"rounds": 2}, "attestation": {"policy": "policy.yaml"}}
    (tmp_path / "policy.yaml").write_text(Policy(measurements={"software": ("ab" * 32,)}, code=("ab" * 32,)).to_yaml())
    site = {"site": {"name": "a", "superlink": "localhost:9999", "tls_ca": "certs/ca.pem",
                     "auth_key": "certs/sites/a/auth.key", "data_dir": "data/site-0", "state_dir": "state/a",
                     "privacy": {"epsilon_budget": 1.5, "delta": 1e-5}}}
    return tmp_path, coord, site


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


def test_coordinator_config_resolves_paths_and_counts_sites(consortium):
    root, coord, _ = consortium
    dc = load_coordinator_config(_write(root / "c.yaml", coord), {"federation.rounds": 4})
    assert dc.run_dir == root / "run" and dc.tls_ca == root / "certs" / "ca.pem"
    assert dc.federation.federation.sites == 2 and dc.federation.federation.rounds == 4
    assert dc.address == "127.0.0.1:9999"


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c.pop("server"), "the 'server' section is missing"),
    (lambda c: c["server"].update(tls_ca="certs/nope.pem"), "server.tls_ca: .*nope.pem does not exist"),
    (lambda c: c["server"].update(port=70000), "server.port: 70000 is not a TCP port"),
    (lambda c: c["server"].update(listen="x"), "server.listen: unknown key"),
    (lambda c: c["server"].update(sites={}), "server.sites: must map each site"),
    (lambda c: c["federation"].update(rounds=0), "federation.rounds"),
])
def test_coordinator_config_errors(consortium, change, match):
    root, coord, _ = consortium
    change(coord)
    with pytest.raises(ConfigError, match=match):
        load_coordinator_config(_write(root / "c.yaml", coord))


def test_site_config_builds_the_node_config(consortium):
    from flwr.common.config import parse_config_args

    from fedsecure.config import SiteSettings

    root, _, site = consortium
    site["site"]["attestation"] = {"provider": "command", "command": ["/opt/agent", "--say", 'a "quoted" arg']}
    site["site"]["training"] = {"processes": "auto", "gradient_compression": "bf16"}
    site["site"]["nccl"] = {"profile": "roce-v2", "ib_gid_index": 1}
    sc = load_site_config(_write(root / "s.yaml", site))
    assert sc.settings.training.processes == "auto" and sc.settings.nccl.ib_gid_index == 1
    node = sc.node_config
    assert node["site.name"] == "a" and node["site.data_dir"] == str(root / "data" / "site-0")
    assert node["site.state_dir"] == str(root / "state" / "a") and node["site.privacy.epsilon_budget"] == 1.5
    assert node["site.privacy.dp_required"] is True and node["site.simulated"] is False
    # the node config travels as a TOML file, read back exactly as flower-supernode reads it
    path = write_node_config(root / "node.toml", node)
    assert path.stat().st_mode & 0o777 == 0o600
    back = parse_config_args([str(path)])
    assert back == node
    assert SiteSettings.from_flat(back) == sc.settings
    with pytest.raises(ConfigError, match="not a finite number"):
        write_node_config(root / "bad.toml", {"x": float("nan")})


@pytest.mark.parametrize(("change", "match"), [
    (lambda s: s["site"].update(superlink="http://x:1"), "is not host:port"),
    (lambda s: s["site"].update(data_dir="."), "train.jsonl is missing"),
    (lambda s: s["site"].update(attestation={"provider": "sgx"}), "site.attestation.provider: must be one of"),
    (lambda s: s["site"].update(attestation_provider="sgx"), "site.attestation_provider: this key moved to "
                                                             "site.attestation.provider"),
    (lambda s: s["site"].update(epsilon=1.0), "site.epsilon: this key moved to site.privacy.epsilon_budget"),
    (lambda s: s["site"].update(name="a b"), "site.name"),
    (lambda s: s["site"].pop("privacy"), "site.privacy: the site's own privacy policy must set epsilon_budget"),
    (lambda s: s["site"]["privacy"].update(epsilon_budget=-1), r"site.privacy.epsilon_budget: must be a finite"),
    (lambda s: s["site"]["privacy"].update(epsilon_budget=float("nan")), r"site.privacy.epsilon_budget: must be a fin"),
    (lambda s: s["site"]["privacy"].update(epsilon_budget=float("inf")), r"site.privacy.epsilon_budget: must be a fin"),
    (lambda s: s["site"]["privacy"].update(delta=0.5), r"site.privacy.delta: must be in \(0, 0.01\)"),
    (lambda s: s["site"]["privacy"].update(delta=None), r"site.privacy.delta: must be a number below 1/N"),
    (lambda s: s["site"]["privacy"].update(min_sigma=0.01), r"site.privacy.min_sigma: must be in \[0.3, 50\]"),
    (lambda s: s["site"]["privacy"].update(accountants=["gdp"]), "can under-report epsilon"),
    (lambda s: s["site"]["privacy"].update(noise_seed=3), "site.privacy.noise_seed: unknown key"),
    (lambda s: s["site"].update(noise_seed=3), "site.noise_seed: unknown key"),
    (lambda s: s.update(extra={}), "extra: unknown section"),
    (lambda s: s["site"].update(warm_worker="yes"), "site.warm_worker: 'yes' must be true or false"),
    (lambda s: s["site"].update(training={"processes": "many"}), "site.training.processes: must be auto or an"),
    (lambda s: s["site"].update(training={"gradient_compression": "powersgd"}), "site.training.gradient_compression: "
                                                                                "must be none or bf16 where"),
    (lambda s: s["site"].update(nccl={"ib_gid_idx": 3}), "site.nccl.ib_gid_idx: unknown key"),
    (lambda s: s["site"].update(nccl={"p2p_level": "far"}), "site.nccl.p2p_level: must be one of"),
])
def test_site_config_errors(consortium, change, match):
    root, _, site = consortium
    change(site)
    with pytest.raises(ConfigError, match=match):
        load_site_config(_write(root / "s.yaml", site))


def test_site_delta_must_be_below_one_over_its_records(consortium):
    root, _, site = consortium
    synthesize(root / "big", sites=1, records_per_site=250, eval_fraction=0.2, seed=2)
    site["site"].update(data_dir="big/site-0", privacy={"epsilon_budget": 3.0, "delta": 0.009})
    with pytest.raises(ConfigError, match=r"delta 0.009 is not below 1/N = 1/200 = 0.005.*publishing one random "
                                          r"record outright.*Fix: use delta <= 1/\(10 N\), e.g. 5.0e-04"):
        load_site_config(_write(root / "s.yaml", site))
    (root / "empty").mkdir()
    (root / "empty" / "train.jsonl").write_text("")
    (root / "empty" / "eval.jsonl").write_text('{"text": "x"}\n')
    site["site"].update(data_dir="empty", privacy={"epsilon_budget": 3.0, "delta": 1e-5})
    from fedsecure.errors import DataError

    with pytest.raises(DataError, match="train.jsonl: no records"):
        load_site_config(_write(root / "s.yaml", site))


def test_coordinator_config_holds_no_site_settings(consortium):
    root, coord, _ = consortium
    coord["site"] = {"privacy": {"epsilon_budget": 100}}
    with pytest.raises(ConfigError, match="a coordinator config holds no site settings"):
        load_coordinator_config(_write(root / "c.yaml", coord))


def test_server_refuses_to_start_without_an_attestation_policy(consortium):
    root, coord, _ = consortium
    coord.pop("attestation")
    res = CliRunner().invoke(app, ["server", "--config", str(_write(root / "c.yaml", coord))])
    assert res.exit_code == 2 and "attestation.policy is not set" in res.output and "dev-policy" in res.output


def test_client_refuses_a_readable_auth_key(consortium):
    root, _, site = consortium
    (root / "certs" / "sites" / "a" / "auth.key").chmod(0o644)
    res = CliRunner().invoke(app, ["client", "--config", str(_write(root / "s.yaml", site))])
    assert res.exit_code == 2 and "readable by group or others" in res.output


def test_dev_policy_writes_a_loadable_policy_and_never_overwrites(tmp_path):
    from fedsecure.attestation.evidence import code_hash
    from fedsecure.attestation.policy import load_policy

    runner = CliRunner()
    out = tmp_path / "policy.yaml"
    res = runner.invoke(app, ["attest", "dev-policy", "--out", str(out), "--epsilon-budget", "2"])
    assert res.exit_code == 0 and "development only" in res.output
    policy = load_policy(out)
    assert policy.measurements == {"software": (code_hash(),)} and policy.min_dp.epsilon_budget == 2.0
    res = runner.invoke(app, ["attest", "dev-policy", "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_the_shipped_site_yaml_is_a_complete_valid_site_policy():
    import dataclasses
    from pathlib import Path

    from fedsecure.config import SiteLimits, SitePolicy, SiteSettings, from_mapping
    from fedsecure.launch.deploy_config import _SITE_KEYS

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "site.yaml").read_text())["site"]
    assert set(doc) == _SITE_KEYS  # every key a site can set is shown to the operator
    own = {k: doc[k] for k in ("dataset_id", "threads", "privacy", "limits", "storage", "attestation")}
    settings = from_mapping(SiteSettings, own, "site.").validate()
    # the shipped policy is the defaults, with the delta that site.yaml must state
    assert settings.privacy == dataclasses.replace(SitePolicy(), delta=1e-5)
    assert settings.limits == SiteLimits() and settings.attestation.provider == "software"
