"""``fedsecure report``: the signed compliance report of a run (coordinator's view) or of a site (its own view).

``fedsecure report RUN_DIR`` reads the run directory; ``fedsecure report --site-state DIR`` reads only one site's
state directory and keyring (its officer need not trust the coordinator); ``fedsecure report verify REPORT.json
--key PUB`` checks the signature and every signed file. The exit code is 1 when the report found a failed
integrity check (a tampered audit log or ledger): the report is still written and says so.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.errors import FedSecureError, ReportError


def default_coordinator_key(run_dir: Path) -> Path:
    """The coordinator's report key, as the run found it: beside the keyring its config.yaml names."""
    import yaml

    from fedsecure.reports.report_files import coordinator_key_path

    keyring = None
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        keyring = (cfg.get("storage") or {}).get("keyring")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    return coordinator_key_path(run_dir, keyring if isinstance(keyring, str) and keyring else None)


def _site_report(state: Path, keyring: Path | None):
    from fedsecure.cli.ledger import Keyrings, _open, _site_default, find_ledgers
    from fedsecure.reports.site_report import build_site_report

    if not state.is_dir():
        raise ReportError(f"{state} is not a directory. Fix: pass --site-state with a site's state directory "
                          "(site.state_dir in its site.yaml).")
    paths = find_ledgers(state)
    parents = sorted({p.parent.resolve() for p in paths})
    if len(parents) > 1:
        raise ReportError(f"{state} holds the ledgers of {len(parents)} sites ({', '.join(p.name for p in parents)}). "
                          "Fix: pass one site's state directory, e.g. --site-state " + str(parents[0]))
    site_state = parents[0]
    rings = Keyrings(keyring)
    opened = []
    for p in paths:
        try:
            opened.append((p, _open(p, rings)))
        except FedSecureError as e:
            opened.append((p, str(e)))
    ring_file = keyring
    if ring_file is None:
        try:
            ring_file, _ = _site_default(site_state)
        except FedSecureError:
            ring_file = None
    report = build_site_report(site_state, opened, keyring=ring_file)
    default_key = (ring_file.parent if ring_file else site_state) / f"{site_state.name}-report.key.pem"
    return report, site_state / "report", default_key


@friendly
def report_cmd(
    target: str | None = typer.Argument(None, help="A run directory; or `verify` followed by a report.json."),
    report_json: Path | None = typer.Argument(None, help="With `verify`: the report.json to check."),
    site_state: Path | None = typer.Option(None, "--site-state", help="Report one site from its own state directory "
                                           "(its sealed ledgers), instead of a run."),
    keyring: Path | None = typer.Option(None, help="With --site-state: the site's keyring (default: as the site "
                                                   "finds it, <state>/../keys/<site>.keyring.json)."),
    out: Path | None = typer.Option(None, help="Folder for report.* (default: the run directory; for a site, "
                                               "<state>/report)."),
    signing_key: Path | None = typer.Option(None, help="Ed25519 report key, PEM, created 0600 if missing (default: "
                                                       "beside the coordinator's or the site's keyring)."),
    no_sign: bool = typer.Option(False, "--no-sign", help="Write an unsigned report."),
    pdf: bool = typer.Option(False, "--pdf", help="Also print report.pdf with headless Chromium."),
    key: Path | None = typer.Option(None, help="With `verify`: the signer's public key (PEM)."),
) -> None:
    """Write the compliance report: report.json (schema docs/report-schema.md), report.md, report.html, signed.

    fedsecure report RUN_DIR: the coordinator's view of one run. fedsecure report --site-state DIR: a site's
    own view, from its ledgers, across every run that used each dataset. fedsecure report verify REPORT.json
    --key PUB: exit 0 only if the signature holds and no signed file changed.
    """
    from fedsecure.reports import report_files

    if target == "verify":
        if report_json is None or key is None:
            raise ReportError("usage: fedsecure report verify REPORT.json --key PUBLIC_KEY.pem")
        statement = report_files.verify_report(report_json, key)
        names = ", ".join(s["name"] for s in statement["subject"])
        pred = statement["predicate"]
        console.print(f"OK: {report_json}: signature valid ({pred.get('kind')} report, generated "
                      f"{pred.get('generated', {}).get('at')}); unchanged: {names}", highlight=False, soft_wrap=True)
        return
    if (target is None) == (site_state is None):
        raise ReportError("pass a run directory (fedsecure report RUN_DIR) or --site-state DIR, one of the two.")
    if site_state is not None:
        report, default_out, default_key = _site_report(site_state, keyring)
    else:
        from fedsecure.reports.compliance import build_run_report

        run_dir = Path(str(target))
        report = build_run_report(run_dir)
        default_out, default_key = run_dir, default_coordinator_key(run_dir)
    written = report_files.write_report(report, out or default_out, signing_key=None if no_sign else
                                        (signing_key or default_key), pdf=pdf)
    for line in report["summary"]:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for f in report["findings"]:
        console.print(f"{f['severity']}: {f['text']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Report: {written.folder / report_files.HTML} (also " +
                  ", ".join(p.name for p in written.files if p.suffix != ".html") + ")", highlight=False,
                  markup=False, soft_wrap=True)
    if written.key_id:
        console.print(f"Signed by report key {written.key_id}; public key {written.public_key}. Verify: fedsecure "
                      f"report verify {written.folder / report_files.JSON} --key {written.public_key}",
                      highlight=False, markup=False, soft_wrap=True)
    integrity = report["integrity"]
    if not integrity["audit_log"]["verified"] or not all(x["verified"] for x in integrity.get("ledgers", [])):
        raise typer.Exit(code=1)
