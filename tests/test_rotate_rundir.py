"""Key rotation over a simulation's run directory: it holds files of several keyrings (the coordinator's adapters,
each site's ledger and residual under the site's own keyring). Rotating one keyring re-wraps its files, skips and
lists the others', refuses a file whose key this keyring retired too early, and never retires a key a file of this
keyring still needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsecure.crypto import generate_keyring, inspect, open_bytes, read_keyring_file, seal_bytes, write_keyring_file
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.rotation import rotate, sealed_files
from fedsecure.errors import KeyMaterialError
from fedsecure.launch.simulate import simulate

from .conftest import global_adapter, site_ledger_entries, small_config

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")


@pytest.fixture(scope="module")
def finished(site_data, tmp_path_factory) -> Path:
    """A sealed two-site run whose sites keep an error-feedback residual (top-k uplink)."""
    run = tmp_path_factory.mktemp("rotate") / "run"
    simulate(small_config(site_data, train={"local_steps": 2}, transport={"uplink_topk": 0.5}), run_dir=run)
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _kek_ids(run: Path) -> dict[str, str]:
    return {str(f.relative_to(run)): inspect(f).kek_id for f in sealed_files([run])}


def _ring(run: Path, party: str) -> Path:
    return run / "keys" / "coordinator.keyring.json" if party == "coordinator" else run / "sites" / "keys" / \
        f"{party}.keyring.json"


def _everything_opens(run: Path) -> None:
    for r in (0, 1):
        assert global_adapter(run, r)  # the coordinator's keyring
    for site in ("site-0", "site-1"):
        assert site_ledger_entries(run / "sites" / site)  # each site's own keyring
        ring = read_keyring_file(_ring(run, site))
        for f in (run / "sites" / site).glob("*.sealed"):
            open_bytes(f, ring)


def _rotate(*args: str):
    from fedsecure.cli import app

    return CliRunner().invoke(app, ["keys", "rotate", *args])


def test_a_run_directory_holds_files_of_three_keyrings(run):
    ids = _kek_ids(run)
    owners = {p: next(party for party in ("coordinator", "site-0", "site-1")
                      if kid in read_keyring_file(_ring(run, party)).keys) for p, kid in ids.items()}
    assert {p for p, o in owners.items() if o == "coordinator"} == {"adapters/global-r0000.safetensors.sealed",
                                                                    "adapters/global-r0001.safetensors.sealed"}
    for site in ("site-0", "site-1"):
        mine = {p for p, o in owners.items() if o == site}
        assert any("privacy-ledger-" in p for p in mine) and any("residual" in p for p in mine), mine
        assert all(p.startswith(f"sites/{site}/") for p in mine)


def test_rotating_the_coordinator_keyring_over_the_run_directory(run):
    before = _kek_ids(run)
    site_bytes = {f: f.read_bytes() for f in (run / "sites").rglob("*.sealed")}
    res = _rotate("--keyring", str(_ring(run, "coordinator")), str(run))
    assert res.exit_code == 0, res.output
    new = read_keyring_file(_ring(run, "coordinator")).current
    assert f"current key {new}: re-wrapped 2 files, 0 already done" in res.output
    skipped = [p for p in before if p.startswith("sites/")]
    assert f"skipped {len(skipped)} files sealed under other keyrings (rotate them with their own keyring)" \
        in res.output
    for p in skipped:
        assert f"{p} (key {before[p]})" in res.output
    after = _kek_ids(run)
    assert {p for p in after if after[p] == new} == {p for p in before if p.startswith("adapters/")}
    assert all(f.read_bytes() == b for f, b in site_bytes.items())  # site files untouched
    _everything_opens(run)


def test_rotating_a_site_keyring_over_the_run_directory_and_retiring(run):
    before = _kek_ids(run)
    ring_file = _ring(run, "site-0")
    old = read_keyring_file(ring_file).current
    ledger = next((run / "sites" / "site-0").glob("privacy-ledger-*.sealed"))
    stale = ledger.read_bytes()  # a copy sealed under the old key (a backup restored later)
    res = _rotate("--keyring", str(ring_file), "--retire", str(run))
    assert res.exit_code == 0, res.output
    ring = read_keyring_file(ring_file)
    mine = [p for p in before if p.startswith("sites/site-0/")]
    assert f"re-wrapped {len(mine)} files" in res.output and f"retired {old}" in res.output
    assert f"skipped {len(before) - len(mine)} files sealed under other keyrings" in res.output
    assert "adapters/global-r0001.safetensors.sealed (key" in res.output and "sites/site-1/" in res.output
    assert ring.keys.keys() == {ring.current} and ring.retired == [old]
    assert json.loads(ring_file.read_text())["retired"] == [old]  # ids only: the key bytes are gone
    after = _kek_ids(run)
    assert all(after[p] == ring.current for p in mine)
    assert all(after[p] == before[p] for p in before if p not in mine)
    _everything_opens(run)

    # the restored backup needs the retired key: an error naming the file and the fix; nothing changes
    ledger.write_bytes(stale)
    ring_text = ring_file.read_text()
    res = _rotate("--keyring", str(ring_file), str(run))
    assert res.exit_code == 2 and res.output.startswith("error: 1 files are sealed under keys this keyring retired")
    assert f"{ledger} (key {old})" in res.output and "Fix: add the old key back to the keyring" in res.output
    assert ring_file.read_text() == ring_text and not ring_file.with_name(ring_file.name + ".rotation").exists()
    with pytest.raises(KeyMaterialError, match=f"key '{old}' was retired from this keyring"):
        open_bytes(ledger, ring)
    # keys show tells a retired key (an error to fix) from another keyring's (the other parties' files)
    from typer.testing import CliRunner

    from fedsecure.cli import app

    shown = CliRunner().invoke(app, ["keys", "show", "--keyring", str(ring_file), "--under", str(run)])
    assert shown.exit_code == 0
    assert f"{old}: seals 1 files but was RETIRED from this keyring" in shown.output
    assert "files under another keyring" in shown.output


def test_a_keyring_that_seals_nothing_there_says_so(run, tmp_path):
    k = write_keyring_file(tmp_path / "other.json", generate_keyring())
    before = _kek_ids(run)
    res = _rotate("--keyring", str(k), str(run))
    assert res.exit_code == 0 and "re-wrapped 0 files" in res.output and "is it the keyring you meant?" in res.output
    assert _kek_ids(run) == before


def test_retire_is_refused_while_a_file_of_this_keyring_still_needs_an_old_key(tmp_path):
    ring = generate_keyring()
    kfile = write_keyring_file(tmp_path / "k.json", ring)
    data = tmp_path / "data"
    for i in range(3):
        seal_bytes(data / f"f{i}.sealed", b"x" * 10, ring)
    foreign = generate_keyring()
    seal_bytes(data / "other.sealed", b"y", foreign)

    def writer_with_the_old_keyring(path):  # a process that loaded the keyring before the rotation
        if path.name == "f1.sealed":
            seal_bytes(data / "late.sealed", b"late", ring)

    with pytest.raises(KeyMaterialError, match=r"still sealed under old keys of this keyring: .*late.sealed"):
        rotate(kfile, [data], retire=True, on_file=writer_with_the_old_keyring)
    mid = read_keyring_file(kfile)
    assert ring.current in mid.keys and mid.retired == []  # the old key is kept
    assert open_bytes(data / "late.sealed", mid)[0] == b"late"
    result = rotate(kfile, [data], retire=True)  # rerun: continues to the same key, then retires
    assert result.new_key == mid.current and result.retired == [ring.current]
    assert result.rewrapped == 1 and result.already == 3
    assert [(p.name, kid) for p, kid in result.skipped] == [("other.sealed", foreign.current)]
    assert inspect(data / "other.sealed").kek_id == foreign.current


def test_keyrings_without_retired_ids_still_read_and_the_ids_round_trip(tmp_path):
    ring = generate_keyring()
    assert "retired" not in json.loads(ring.to_json())  # unchanged format until a key is retired
    again = KeyRing.from_json(ring.to_json(), "test")
    assert again.keys == ring.keys and again.retired == []
    kept = KeyRing(current=ring.current, keys=ring.keys, retired=["kek-00000000"])
    assert KeyRing.from_json(kept.to_json(), "test").retired == ["kek-00000000"]
    with pytest.raises(KeyMaterialError, match="is not a keyring"):
        KeyRing.from_json(json.dumps({**json.loads(ring.to_json()), "retired": "kek-1"}), "test")
