"""The Ansible role that installs a hospital site: syntax, then a real run with ``-c local`` into a temporary root
(no user creation, no systemctl), files and modes checked, idempotent, and stopped by ``fedsecure doctor``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsecure.crypto import generate_keyring
from fedsecure.crypto.keys import write_keyring_file
from fedsecure.data.synth import synthesize
from fedsecure.launch.certs import init as certs_init

ANSIBLE = Path(__file__).resolve().parents[1] / "deploy" / "ansible"
pytestmark = pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                reason="ansible-playbook is not installed (.ci/run installs Debian's ansible-core)")


def _play(tmp: Path, extra: dict) -> subprocess.CompletedProcess:
    play = tmp / "play.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  roles: [fedsecure_site]\n")
    (tmp / "vars.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"), "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-tmp")}
    return subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(play),
                           "-e", f"@{tmp / 'vars.json'}"], env=env, capture_output=True, text=True, timeout=600)


def test_playbook_syntax():
    out = subprocess.run(["ansible-playbook", "--syntax-check", "-i", "localhost,", str(ANSIBLE / "site.yml")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles")})
    assert out.returncode == 0, out.stdout + out.stderr


def test_role_installs_a_site_into_a_temporary_root(tmp_path):
    certs_init(tmp_path / "certs", ["localhost", "127.0.0.1"], ["site-3"])
    root = tmp_path / "root"
    synthesize(root / "srv" / "data", sites=1, records_per_site=40, eval_fraction=0.2, seed=1)
    write_keyring_file(tmp_path / "site-3.keyring.json", generate_keyring())
    user = __import__("pwd").getpwuid(os.getuid()).pw_name
    group = __import__("grp").getgrgid(os.getgid()).gr_name
    extra = {"fedsecure_root": str(root), "fedsecure_manage_user": False, "fedsecure_user": user,
             "fedsecure_group": group, "fedsecure_site_name": "site-3", "fedsecure_superlink": "127.0.0.1:9",
             "fedsecure_data_dir": "/srv/data/site-0", "fedsecure_attestation_provider": "software",
             "fedsecure_ca_src": str(tmp_path / "certs" / "ca.pem"),
             "fedsecure_auth_key_src": str(tmp_path / "certs" / "sites" / "site-3" / "auth.key"),
             "fedsecure_keyring_src": str(tmp_path / "site-3.keyring.json"),
             "fedsecure_bin": str(Path(sys.executable).with_name("fedsecure")),
             "fedsecure_metrics": {"enabled": True, "host": "127.0.0.1", "port": 9511}}
    res = _play(tmp_path, extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    etc, state = root / "etc" / "fedsecure", root / "var" / "lib" / "fedsecure"
    modes = {p: oct(p.stat().st_mode & 0o777) for p in (etc, etc / "auth.key", etc / "site.yaml", state,
                                                          state / "site-3", state / "keys" / "site-3.keyring.json")}
    assert list(modes.values()) == ["0o750", "0o600", "0o640", "0o700", "0o700", "0o600"], modes
    from fedsecure.launch.deploy_config import load_site_config

    sc = load_site_config(etc / "site.yaml")
    assert sc.name == "site-3" and sc.settings.privacy.epsilon_budget == 3.0 and sc.superlink == "127.0.0.1:9"
    assert (sc.metrics.enabled, sc.metrics.host, sc.metrics.port) == (True, "127.0.0.1", 9511)
    unit = (root / "etc" / "systemd" / "system" / "fedsecure-site.service").read_text()
    assert "ExecStartPre=" in unit and " doctor -c " in unit and "ProtectSystem=strict" in unit
    assert "FLWR_TELEMETRY_ENABLED=0" in unit
    again = _play(tmp_path, extra)  # idempotent: nothing changes on a second run
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-2000:]

    # a site.yaml whose data folder is not there stops the rollout at the doctor
    res = _play(tmp_path, {**extra, "fedsecure_data_dir": "/srv/nothing-here"})
    assert res.returncode != 0 and "Pre-flight check" in res.stdout, res.stdout[-3000:]
    assert "FAIL" in res.stdout and "nothing-here" in res.stdout
    assert yaml.safe_load((etc / "site.yaml").read_text())["site"]["data_dir"].endswith("nothing-here")
