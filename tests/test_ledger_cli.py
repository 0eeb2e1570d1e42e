"""``fedsecure ledger show|verify``: a compliance officer reads and checks a site's privacy ledgers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.crypto import generate_keyring, open_bytes, read_keyring_file, seal_bytes, write_keyring_file
from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.privacy.ledger import PrivacyLedger, open_ledger_file
from fedsecure.reports.ledger import entry_epsilon_added, runs_of, totals_of

runner = CliRunner()
DATASET = "ab" * 32
DELTA = 1e-5
BUDGET = 8.0


def _fill(led: PrivacyLedger, accountant: str = "rdp") -> None:
    """Run A trains rounds 1 and 2, run B trains round 1 and is refused round 2."""
    spends: list[Spend] = []
    for run_id, server_round in (("run-a/1", 1), ("run-a/1", 2), ("run-b/7", 1)):
        spends.append(Spend(1.0, 0.1, 20))
        led.append(run_id=run_id, server_round=server_round, spend=spends[-1], delta=DELTA, accountant=accountant,
                   max_grad_norm=1.0, epsilon_after=epsilon_of(spends, DELTA, accountant), epsilon_budget=BUDGET)
    led.append_refusal(run_id="run-b/7", server_round=2, reason="privacy budget exhausted", delta=DELTA,
                       accountant=accountant, epsilon_spent=epsilon_of(spends, DELTA, accountant),
                       epsilon_budget=BUDGET)


def _eps(n_spends: int, accountant: str = "rdp") -> float:
    return epsilon_of([Spend(1.0, 0.1, 20)] * n_spends, DELTA, accountant)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A simulation run directory: sites/site-0 and sites/site-1 with sealed ledgers, keyrings in sites/keys/."""
    run = tmp_path / "run"
    for name in ("site-0", "site-1"):
        ring = generate_keyring()
        write_keyring_file(run / "sites" / "keys" / f"{name}.keyring.json", ring)
        led = PrivacyLedger.open(run / "sites" / name, DATASET if name == "site-0" else "cd" * 32, ring=ring)
        _fill(led)
    return run


def _sealed(run_dir: Path, site: str = "site-0") -> Path:
    (path,) = (run_dir / "sites" / site).glob("privacy-ledger-*.jsonl.sealed")
    return path


def _one_line_error(res, *needles: str) -> str:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert text.startswith("error: "), text
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in text, text
    return text


# --------------------------------------------------------------------------- the library
def test_runs_and_totals_of_a_ledger(run_dir):
    ring = read_keyring_file(run_dir / "sites" / "keys" / "site-0.keyring.json")
    led = open_ledger_file(_sealed(run_dir), ring)
    assert [e.kind for e in led.entries] == ["spend", "spend", "spend", "refusal"]
    added = entry_epsilon_added(led)
    assert added[0] == pytest.approx(_eps(1)) and added[3] == 0.0
    assert sum(added) == pytest.approx(_eps(3))
    a, b = runs_of(led)
    assert (a.run_id, a.rounds, a.refused) == ("run-a/1", (1, 2), ())
    assert (b.run_id, b.rounds, b.refused) == ("run-b/7", (1,), (2,))
    assert a.epsilon_added == pytest.approx(_eps(2)) and a.epsilon_after == pytest.approx(_eps(2))
    assert b.epsilon_added == pytest.approx(_eps(3) - _eps(2)) and b.epsilon_after == pytest.approx(_eps(3))
    t = totals_of(led)
    assert (t.entries, t.spends, t.refusals, t.non_private) == (4, 3, 1, 0)
    assert t.epsilon_spent == pytest.approx(_eps(3)) and t.epsilon_left == pytest.approx(BUDGET - _eps(3))


def test_a_non_private_release_makes_the_total_unbounded(tmp_path):
    led = PrivacyLedger.open(tmp_path, DATASET)
    _fill(led)
    led.append_non_private(run_id="run-c/1", server_round=1, steps=5, epsilon_budget=BUDGET)
    led = open_ledger_file(led.path)
    assert math.isinf(totals_of(led).epsilon_spent) and totals_of(led).epsilon_left == 0.0
    assert runs_of(led)[-1].non_private and runs_of(led)[-1].epsilon_after is None
    res = runner.invoke(app, ["ledger", "show", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    totals = json.loads(res.output)["ledgers"][0]["totals"]
    assert totals["epsilon_spent"] is None and totals["bounded"] is False
    assert "unbounded" in runner.invoke(app, ["ledger", "show", str(tmp_path)]).output


def test_an_accountant_switch_never_gives_a_negative_share(tmp_path):
    led = PrivacyLedger.open(tmp_path, DATASET)
    _fill(led, "rdp")
    spends = [Spend(1.0, 0.1, 20)] * 4
    led.append(run_id="run-d/1", server_round=1, spend=spends[-1], delta=DELTA, accountant="prv", max_grad_norm=1.0,
               epsilon_after=epsilon_of(spends, DELTA, "prv"), epsilon_budget=BUDGET)
    added = entry_epsilon_added(open_ledger_file(led.path))
    assert added[-1] == pytest.approx(epsilon_of(spends, DELTA, "prv") - epsilon_of(spends[:3], DELTA, "prv"))
    assert all(a >= 0 for a in added)


# --------------------------------------------------------------------------- show
def test_show_lists_entries_runs_and_totals(run_dir):
    res = runner.invoke(app, ["ledger", "show", str(run_dir / "sites" / "site-0")])
    assert res.exit_code == 0, res.output
    out = re.sub(r"[\s│┃]+", " ", res.output)  # the tables' borders and wrapping out of the way
    for needle in ("run-a/1", "run-b/7", "refusal", "privacy budget exhausted", "Runs that used this dataset",
                   f"ε spent: {_eps(3):.4f} of budget {BUDGET:g}", f"left: {BUDGET - _eps(3):.4f}",
                   "3 spends, 1 refusals", "sealed", DATASET[:16], f"{_eps(2):.4f}", f"{_eps(3) - _eps(2):.4f}"):
        assert needle in out, (needle, out)


def test_show_json_of_a_whole_run_directory(run_dir):
    res = runner.invoke(app, ["ledger", "show", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)["ledgers"]
    assert [Path(d["ledger"]).parent.name for d in docs] == ["site-0", "site-1"]
    doc = docs[0]
    assert doc["dataset"] == DATASET and doc["sealed"] is True and len(doc["entries"]) == 4
    assert [e["kind"] for e in doc["entries"]] == ["spend", "spend", "spend", "refusal"]
    assert {"seq", "time", "run_id", "server_round", "sigma", "q", "steps", "epsilon_after", "epsilon_budget",
            "reason", "hash", "prev"} <= doc["entries"][0].keys()
    assert [(r["run_id"], r["rounds"], r["refused"]) for r in doc["runs"]] == [("run-a/1", [1, 2], []),
                                                                              ("run-b/7", [1], [2])]
    assert sum(r["epsilon_added"] for r in doc["runs"]) == pytest.approx(doc["totals"]["epsilon_spent"])
    assert doc["totals"]["epsilon_spent"] == pytest.approx(_eps(3))
    assert doc["totals"]["epsilon_left"] == pytest.approx(BUDGET - _eps(3))
    assert doc["head"] == doc["entries"][-1]["hash"]


def test_a_deployed_site_is_found_through_its_node_config(tmp_path):
    # the state directory is not named after the site; the keyring is where the site's own config says
    from fedsecure.config import SiteSettings, StorageSettings
    from fedsecure.launch.deploy_config import write_node_config

    ring = generate_keyring()
    keyring = write_keyring_file(tmp_path / "secure" / "hospital-a.keyring.json", ring)
    state = tmp_path / "hospital-a" / "state"
    _fill(PrivacyLedger.open(state, DATASET, ring=ring))
    site = SiteSettings(name="hospital-a", data_dir=str(tmp_path / "data"), state_dir=str(state),
                        storage=StorageSettings(keyring=str(keyring)))
    write_node_config(state / "node-config.toml", site.to_flat())
    res = runner.invoke(app, ["ledger", "verify", str(state)])
    assert res.exit_code == 0, res.output
    assert "OK: " in res.output and "4 entries" in res.output


# --------------------------------------------------------------------------- verify
def test_verify_ok_prints_entries_and_head(run_dir):
    ring = read_keyring_file(run_dir / "sites" / "keys" / "site-0.keyring.json")
    head = open_ledger_file(_sealed(run_dir), ring).head
    res = runner.invoke(app, ["ledger", "verify", str(_sealed(run_dir))])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"OK: {_sealed(run_dir)}: 4 entries, hash chain intact, ε recomputed, head {head}"
    res = runner.invoke(app, ["ledger", "verify", str(run_dir)])
    assert res.exit_code == 0 and res.output.count("OK: ") == 2, res.output


def _edit_second_sigma(text: str) -> str:
    lines = text.splitlines()
    entry = json.loads(lines[1])
    entry["sigma"] = 2.0  # the attacker lowers the recorded noise... of an entry whose hash now does not match
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return "\n".join(lines) + "\n"


def test_verify_a_tampered_sealed_ledger_names_the_entry(run_dir):
    path = _sealed(run_dir)
    ring = read_keyring_file(run_dir / "sites" / "keys" / "site-0.keyring.json")
    plain, meta = open_bytes(path, ring)
    seal_bytes(path, _edit_second_sigma(bytes(plain).decode()).encode(), ring, meta)  # someone with the site's key
    for cmd in ("verify", "show"):
        _one_line_error(runner.invoke(app, ["ledger", cmd, str(path)]), f"privacy ledger {path}, entry 2 was edited",
                        "restore the ledger from a backup")


def test_verify_a_damaged_sealed_file_says_it_cannot_be_opened(run_dir):
    path = _sealed(run_dir)
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(path)]), f"privacy ledger {path} cannot be opened")


def test_verify_a_tampered_plain_ledger_names_the_entry(tmp_path):
    led = PrivacyLedger.open(tmp_path, DATASET)
    _fill(led)
    assert runner.invoke(app, ["ledger", "verify", str(led.path)]).exit_code == 0
    led.path.write_text(_edit_second_sigma(led.path.read_text()))
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(tmp_path)]),
                    f"privacy ledger {led.path}, entry 2 was edited")
    lines = led.path.read_text().splitlines()
    led.path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # an entry removed
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(led.path)]), "entry 2 breaks the hash chain")


def test_a_renamed_ledger_is_refused(tmp_path):
    led = PrivacyLedger.open(tmp_path, DATASET)
    _fill(led)
    other = tmp_path / "privacy-ledger-0123456789abcdef.jsonl"
    led.path.rename(other)
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(other)]), "the file was renamed or replaced")


# --------------------------------------------------------------------------- errors a user meets first
def test_missing_keyring_says_which_keyring_to_pass(run_dir):
    (run_dir / "sites" / "keys" / "site-0.keyring.json").unlink()
    path = _sealed(run_dir)
    text = _one_line_error(runner.invoke(app, ["ledger", "show", str(path)]), "is sealed", "--keyring",
                           str(run_dir / "sites" / "keys" / "site-0.keyring.json"))
    assert "site-0.keyring.json" in text
    missing = run_dir / "nowhere.keyring.json"
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(path), "--keyring", str(missing)]),
                    f"{missing} does not exist", "--keyring")
    # the right keyring passed by hand opens it
    ring = generate_keyring()
    res = runner.invoke(app, ["ledger", "verify", str(path), "--keyring",
                              str(write_keyring_file(run_dir / "other.keyring.json", ring))])
    _one_line_error(res, "cannot be opened", "use the site's own keyring")


def test_missing_path_and_a_folder_without_ledgers(tmp_path):
    _one_line_error(runner.invoke(app, ["ledger", "show", str(tmp_path / "nope")]), "does not exist",
                    "a site's state directory")
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(tmp_path)]), "no privacy ledger")
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(runner.invoke(app, ["ledger", "verify", str(tmp_path / "notes.txt")]), "is not a privacy ledger")


def test_a_run_that_kept_its_ledgers_in_a_state_dir_is_followed(tmp_path):
    # `simulate --set site.state_dir=state/`: the run directory's config.yaml says where the ledgers are
    state = tmp_path / "state"
    ring = generate_keyring()
    write_keyring_file(state / "keys" / "site-0.keyring.json", ring)
    _fill(PrivacyLedger.open(state / "site-0", DATASET, ring=ring))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"site:\n  state_dir: {state}\n")
    res = runner.invoke(app, ["ledger", "verify", str(run)])
    assert res.exit_code == 0 and str(state / "site-0") in res.output, res.output
    (run / "config.yaml").write_text(f"site:\n  state_dir: {tmp_path / 'elsewhere'}\n")
    _one_line_error(runner.invoke(app, ["ledger", "show", str(run)]), "its site.state_dir")
