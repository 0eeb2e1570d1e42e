"""The compliance report: every figure from its source, ε recomputed independently, signed, tamper-evident."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.crypto import generate_keyring
from fedsecure.crypto.keys import write_keyring_file
from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.privacy.ledger import PrivacyLedger
from fedsecure.reports import mechanisms as mech
from fedsecure.reports.compliance import build_run_report
from fedsecure.reports.report_files import find_chromium, write_report
from fedsecure.store.files import StateFiles
from tests.synthetic_run import DELTA, make_run

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, list(args))


# ------------------------------------------------------------------------------------------- a site's ledgers
def _site_state(root: Path, *, sealed: bool = True) -> tuple[Path, Path, list[list[Spend]]]:
    """A site state dir with one dataset ledger used by two runs (and one refusal), its keyring at the default."""
    state = root / "state" / "hospital-a"
    keyring = root / "state" / "keys" / "hospital-a.keyring.json"
    ring = generate_keyring()
    write_keyring_file(keyring, ring)
    led = PrivacyLedger.open(state, "d" * 64, files=StateFiles(ring if sealed else None))
    runs = [[Spend(1.1, 0.08, 16), Spend(1.1, 0.08, 16)], [Spend(1.3, 0.05, 20)]]
    done: list[Spend] = []
    for run_no, spends in enumerate(runs):
        for rnd, sp in enumerate(spends, 1):
            done.append(sp)
            led.append(run_id=f"run-{run_no}", server_round=rnd, spend=sp, delta=DELTA, accountant="prv",
                       max_grad_norm=1.0, epsilon_after=epsilon_of(done, DELTA, "prv"), epsilon_budget=8.0)
    led.append_refusal(run_id="run-1", server_round=2, reason="privacy.max_grad_norm 5 exceeds site.privacy.max_clip 2",
                       delta=DELTA, accountant="prv", epsilon_spent=epsilon_of(done, DELTA), epsilon_budget=8.0)
    (state / "site-events.jsonl").write_text("".join(
        json.dumps({"event": "trained", "run": f"run-{i}", "round": 1, "records": 400}) + "\n" for i in range(2)))
    return state, keyring, runs


def test_site_report_shows_both_runs_and_their_composition(tmp_path):
    state, keyring, runs = _site_state(tmp_path)
    # only the site's state and keyring: copied away from everything else
    alone = tmp_path / "elsewhere"
    shutil.copytree(state.parent, alone / "state")
    res = _cli("report", "--site-state", str(alone / "state" / "hospital-a"))
    assert res.exit_code == 0, res.output
    report = json.loads((alone / "state" / "hospital-a" / "report" / "report.json").read_text())
    (row,) = report["sites"]
    assert [r["run"] for r in row["runs"]] == ["run-0", "run-1"]
    every = [s for spends in runs for s in spends]
    lifetime = epsilon_of(every, DELTA, "prv")
    first = epsilon_of(runs[0], DELTA, "prv")
    assert row["runs"][0]["epsilon_after"] == pytest.approx(first)
    assert row["runs"][1]["epsilon_after"] == pytest.approx(lifetime)
    # composition, not a sum: the second run adds less than its own ε alone would
    assert row["runs"][1]["epsilon_added"] == pytest.approx(lifetime - first)
    assert lifetime < first + epsilon_of(runs[1], DELTA, "prv")
    assert row["epsilon"]["lifetime_reported"] == pytest.approx(lifetime)
    assert row["epsilon"]["budget"] == 8.0
    assert row["epsilon"]["remaining"] == pytest.approx(8.0 - row["epsilon"]["shown"])
    assert row["steps_this_run"] == sum(s.steps for s in every)
    assert (row["sigma"], row["q"], row["delta"], row["records"]) == (1.3, 0.05, DELTA, 400)
    assert row["delta_below_one_over_n"] is True
    assert row["refused"] == [{"round": 2, "run": "run-1", "event": "refusal",
                               "reason": "privacy.max_grad_norm 5 exceeds site.privacy.max_clip 2"}]
    assert [r["sigma"] for r in row["releases"] if r["kind"] == "spend"] == [s.sigma for s in every]
    md = (alone / "state" / "hospital-a" / "report" / "report.md").read_text()
    assert "run-0" in md and "run-1" in md and "max_clip" in md


def test_recomputed_epsilon_agrees_within_half_a_percent_and_the_larger_is_shown(tmp_path):
    state, _, _ = _site_state(tmp_path)
    assert _cli("report", "--site-state", str(state), "--no-sign").exit_code == 0
    e = json.loads((state / "report" / "report.json").read_text())["sites"][0]["epsilon"]
    assert abs(e["this_run_recomputed"] - e["lifetime_reported"]) <= 0.005 * e["lifetime_reported"]
    assert e["within_tolerance"] is True
    assert e["shown"] >= e["lifetime_reported"] and e["shown"] >= e["this_run_recomputed"]


def test_the_mechanisms_in_the_report_recompute_with_dp_accounting_alone(tmp_path):
    """Anyone can rebuild the DpEvents from report.json with dp-accounting and get the reported figure."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    make_run(tmp_path / "run")
    report = build_run_report(tmp_path / "run")
    for release, site in zip(report["releases"], report["sites"], strict=True):
        events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
            e["event"]["sampling_probability"], dp_event.GaussianDpEvent(e["event"]["event"]["noise_multiplier"])),
            e["count"]) for e in release["mechanism"]["events"]]
        acc = PLDAccountant(value_discretization_interval=mech.PLD_INTERVAL)
        acc.compose(dp_event.ComposedDpEvent(events))
        assert acc.get_epsilon(DELTA) == pytest.approx(site["epsilon"]["this_run_recomputed"], rel=1e-9)


def test_rdp_sites_are_recomputed_with_rdp():
    d = mech.describe([(1.1, 0.05, 300)])
    ours = epsilon_of([Spend(1.1, 0.05, 300)], DELTA, "rdp")
    assert mech.recompute(d, DELTA, "rdp") == pytest.approx(ours, rel=1e-3)
    assert mech.recompute(d, DELTA, "prv") < ours  # PLD is tighter than RDP


def test_run_report_figures_equal_their_sources(tmp_path):
    run = tmp_path / "run"
    summary = make_run(run, sites=3, rounds=4, refuse={"site-2": 3})
    report = build_run_report(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(report["sites"]) == 3
    for row in report["sites"]:
        src = summary["privacy"]["sites"][row["site"]]
        for key in ("sigma", "q", "delta", "max_grad_norm", "steps_this_run", "rounds_trained", "accountant"):
            assert row[key] == src[key], key
        assert row["epsilon"]["lifetime_reported"] == src["epsilon_spent"]
        assert row["epsilon"]["budget"] == src["epsilon_budget"]
        mine = [m for m in metrics if m.get("site") == row["site"]]
        assert row["epsilon_by_round"] == [[m["round"], m["epsilon"]] for m in mine]
        assert row["records"] == mine[-1]["records"]
        assert row["epsilon"]["within_tolerance"] is True
        e = row["epsilon"]
        assert e["shown"] >= max(e["lifetime_reported"], e["this_run_recomputed"])
    retired = report["sites"][2]
    assert retired["status"] == "retired" and retired["rounds_trained"] == [1, 2]
    assert retired["refused"] == [{"round": 3, "event": "site.refused",
                                   "reason": "privacy.noise_multiplier 0.2 is below site.privacy.min_sigma 0.5"}]
    assert report["series"]["eval_loss"] == [[h["round"], h["eval_loss"]] for h in summary["rounds"]]
    assert report["series"]["bytes"] == [[h["round"], h["bytes_down"], h["bytes_up"]] for h in summary["rounds"]]
    assert len(report["attestation"]["records"]) == 3 * 4 - 2
    assert report["integrity"]["audit_log"]["verified"] is True
    assert report["integrity"]["audit_log"]["head"] == summary["attestation"]["audit_head"]
    assert not [f for f in report["findings"] if f["severity"] == "error"]


def test_an_optimistic_site_figure_is_flagged_and_the_larger_shown(tmp_path):
    run = tmp_path / "run"
    summary = make_run(run)
    summary["privacy"]["sites"]["site-1"]["epsilon_spent"] *= 0.9  # a site under-reports its ε
    (run / "summary.json").write_text(json.dumps(summary))
    report = build_run_report(run)
    row = report["sites"][1]
    assert row["epsilon"]["within_tolerance"] is False
    assert row["epsilon"]["shown"] == row["epsilon"]["this_run_recomputed"] > row["epsilon"]["lifetime_reported"]
    assert any("site-1" in f["text"] and "differ" in f["text"] for f in report["findings"])


# ------------------------------------------------------------------------------------------- signing
def test_verify_accepts_the_untouched_report_and_rejects_a_changed_byte(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    res = _cli("report", str(run))
    assert res.exit_code == 0, res.output
    pub = run / "keys" / "coordinator-report.pub.pem"
    assert _cli("report", "verify", str(run / "report.json"), "--key", str(pub)).exit_code == 0
    html = (run / "report.html").read_text()
    import hashlib

    assert hashlib.sha256((run / "report.json").read_bytes()).hexdigest() in html
    for name in ("report.json", "report.html", "report.md"):
        original = (run / name).read_bytes()
        i = original.index(b"site-1") + 5
        (run / name).write_bytes(original[:i] + b"7" + original[i + 1:])
        res = _cli("report", "verify", str(run / "report.json"), "--key", str(pub))
        assert res.exit_code == 2 and "changed after it was signed" in res.output, (name, res.output)
        (run / name).write_bytes(original)
    other = tmp_path / "other.key.pem"
    write_report(build_run_report(run), tmp_path / "x", signing_key=other)
    res = _cli("report", "verify", str(run / "report.json"), "--key", str(tmp_path / "other.pub.pem"))
    assert res.exit_code == 2 and "no signature verifies" in res.output
    env = json.loads((run / "report.dsse.json").read_text())
    env["payloadType"] = "text/plain"
    (run / "report.dsse.json").write_text(json.dumps(env))
    assert _cli("report", "verify", str(run / "report.json"), "--key", str(pub)).exit_code == 2


def test_the_opendp_registry_entry_is_a_signed_yaml_file_equal_to_the_report(tmp_path):
    import yaml

    run = tmp_path / "run"
    make_run(run)
    assert _cli("report", str(run)).exit_code == 0
    entry = yaml.safe_load((run / "opendp-registry.yaml").read_text())
    assert entry == json.loads((run / "report.json").read_text())["opendp_registry"]
    assert entry  # the fields are filled, not an empty mapping
    pub = run / "keys" / "coordinator-report.pub.pem"
    res = _cli("report", "verify", str(run / "report.json"), "--key", str(pub))
    assert res.exit_code == 0 and "opendp-registry.yaml" in res.output
    (run / "opendp-registry.yaml").write_text((run / "opendp-registry.yaml").read_text().replace("1", "2", 1))
    assert _cli("report", "verify", str(run / "report.json"), "--key", str(pub)).exit_code == 2


def test_the_report_key_is_private_and_never_in_the_report(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    assert _cli("report", str(run)).exit_code == 0
    key = run / "keys" / "coordinator-report.key.pem"
    assert key.stat().st_mode & 0o077 == 0
    secret = key.read_text().splitlines()[1]
    for name in ("report.json", "report.html", "report.md", "report.dsse.json"):
        assert secret not in (run / name).read_text()


# ------------------------------------------------------------------------------------------- tampering
def test_a_tampered_audit_log_is_reported_as_such(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    log = run / "audit.log"
    log.write_text(log.read_text().replace('"round":2', '"round":5', 1))
    res = _cli("report", str(run))
    assert res.exit_code == 1, res.output
    report = json.loads((run / "report.json").read_text())
    assert report["integrity"]["audit_log"]["verified"] is False
    assert report["integrity"]["audit_log"]["result"].startswith("FAILED")
    assert report["findings"][0]["severity"] == "error" and "Audit log" in report["findings"][0]["text"]
    assert any("FAILED VERIFICATION" in s for s in report["summary"])
    assert "intact" not in " ".join(report["summary"])
    assert 'class="bad">Audit log: FAILED' in (run / "report.html").read_text()


def test_a_truncated_audit_log_is_caught_by_the_recorded_head(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    log = run / "audit.log"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-2]))
    report = build_run_report(run)
    assert report["integrity"]["audit_log"]["verified"] is False


def test_a_tampered_ledger_is_reported_failed_with_no_figures(tmp_path):
    state, _, _ = _site_state(tmp_path, sealed=False)
    ledger = next(state.glob("privacy-ledger-*.jsonl"))
    ledger.write_text(ledger.read_text().replace('"sigma":1.3', '"sigma":9.3', 1))
    res = _cli("report", "--site-state", str(state))
    assert res.exit_code == 1, res.output
    report = json.loads((state / "report" / "report.json").read_text())
    (row,) = report["sites"]
    assert row["verified"] is False and row["status"] == "FAILED VERIFICATION"
    assert row["epsilon"]["shown"] is None and row["runs"] == []
    assert "edited" in row["verification"]
    assert report["findings"][0]["severity"] == "error"


def test_a_sealed_ledger_without_its_keyring_is_reported_not_shown_as_fine(tmp_path):
    state, keyring, _ = _site_state(tmp_path)
    keyring.unlink()
    res = _cli("report", "--site-state", str(state), "--no-sign")
    assert res.exit_code == 1
    row = json.loads((state / "report" / "report.json").read_text())["sites"][0]
    assert row["verified"] is False and "keyring" in row["verification"]


def test_verifying_an_unsigned_report_says_it_is_not_signed(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    assert _cli("report", str(run), "--no-sign").exit_code == 0
    assert not (run / "report.dsse.json").exists()
    res = _cli("report", "verify", str(run / "report.json"), "--key", str(tmp_path / "any.pem"))
    assert res.exit_code == 2 and "not signed" in res.output and "Fix:" in res.output


def test_bad_input_gets_a_clear_error(tmp_path):
    res = _cli("report", str(tmp_path))
    assert res.exit_code == 2 and "summary.json is missing" in res.output and "Fix:" in res.output
    res = _cli("report")
    assert res.exit_code == 2 and "--site-state" in res.output
    res = _cli("report", "verify", str(tmp_path / "report.json"), "--key", str(tmp_path / "k.pem"))
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "summary.json").write_text("{not json")
    res = _cli("report", str(tmp_path))
    assert res.exit_code == 2 and "cannot read" in res.output


def test_unbounded_epsilon_is_null_in_json_and_an_error(tmp_path):
    run = tmp_path / "run"
    summary = make_run(run)
    summary["privacy"]["sites"]["site-0"].update(epsilon_spent=None, status="exhausted")
    (run / "summary.json").write_text(json.dumps(summary))
    report = build_run_report(run)
    assert report["sites"][0]["epsilon"]["unbounded"] is True
    out = write_report(report, tmp_path / "out", signing_key=None)
    data = json.loads((out.folder / "report.json").read_text())
    assert data["sites"][0]["epsilon"]["shown"] is None
    assert any("unbounded" in f["text"] for f in report["findings"])
    assert not math.isinf(json.loads((out.folder / "report.json").read_text())["sites"][1]["epsilon"]["shown"])


# ------------------------------------------------------------------------------------------- a real browser
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed "
                                    "(.ci/run installs it: apt-get install chromium)")


@needs_chromium
def test_report_html_in_headless_chromium_without_script_or_network(tmp_path):
    from tests import cdp

    run = tmp_path / "run"
    make_run(run, sites=4, rounds=5)
    assert _cli("report", str(run)).exit_code == 0
    shot = tmp_path / "report.png"
    seen = cdp.render(run / "report.html", shot, ["tr.site-row", "#chart-epsilon", "#chart-epsilon polyline",
                                                  "#chart-loss polyline", "script", "#summary li", "#json-digest"])
    assert seen["title"] == "<title>Privacy report: run run</title>"
    assert seen["counts"]["tr.site-row"] == 4
    assert seen["counts"]["#chart-epsilon"] == 1 and seen["counts"]["#chart-epsilon polyline"] == 4
    assert seen["counts"]["#chart-loss polyline"] == 1
    assert seen["counts"]["script"] == 0 and seen["counts"]["#summary li"] >= 3
    assert seen["requests"] == [(run / "report.html").resolve().as_uri()]  # nothing else was fetched
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height > 2000  # the whole page, not a blank viewport


@needs_chromium
def test_pdf_is_printed_and_signed(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    res = _cli("report", str(run), "--pdf")
    assert res.exit_code == 0, res.output
    assert (run / "report.pdf").read_bytes()[:5] == b"%PDF-"
    pub = run / "keys" / "coordinator-report.pub.pem"
    res = _cli("report", "verify", str(run / "report.json"), "--key", str(pub))
    assert res.exit_code == 0 and "report.pdf" in res.output


def test_client_level_guarantee_is_shown_apart_and_never_merged(tmp_path):
    run = tmp_path / "run"
    summary = make_run(run)
    summary["privacy"]["client_level"] = {"enabled": True, "unit": "one site's entire contribution to a round",
                                          "epsilon": 7.25, "delta": 1e-5, "clip": 1.0, "noise_multiplier": 1.1,
                                          "rounds": 3, "q": [1.0], "accountant": "prv"}
    (run / "summary.json").write_text(json.dumps(summary))
    report = build_run_report(run)
    assert report["guarantees"]["client_level"]["epsilon"] == 7.25
    assert all(s["epsilon"]["shown"] < 7.25 for s in report["sites"])  # record-level figures untouched by it
    out = write_report(report, tmp_path / "out", signing_key=None)
    html = (out.folder / "report.html").read_text()
    client = html[html.index('id="client-level"'):html.index('<h2>Privacy spent per site')]
    assert "ε = 7.250 at δ = 1e-05 over 3 rounds" in client and "never added to or merged" in client
    record = html[html.index('id="record-level"'):html.index('id="client-level"')]
    assert "7.25" not in record


def test_agreement_allows_prvs_absolute_error_at_small_epsilon_only():
    # a later run of a dataset spends little: PRV's upper bound sits about 0.01 above PLD there (seen: 0.15598 vs
    # 0.14598 for the second of two demo runs)
    assert mech.agreement(0.15598, 0.14598)["within_tolerance"] is True
    assert mech.agreement(3.0, 2.99)["within_tolerance"] is True  # 0.33%
    assert mech.agreement(3.0, 2.97)["within_tolerance"] is False  # 1%
    assert mech.agreement(0.156, 0.13)["within_tolerance"] is False
    assert mech.agreement(3.0, 2.97)["shown"] == 3.0 and mech.agreement(2.97, 3.0)["shown"] == 3.0
