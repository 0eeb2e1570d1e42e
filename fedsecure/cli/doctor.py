"""``fedsecure doctor``: check a site's or the coordinator's deployment before starting it (changes nothing)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly


@friendly
def doctor_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="A site's site.yaml or the coordinator's "
                                                           "coordinator.yaml."),
) -> None:
    """Pre-flight check: config, certificates, key file modes, keyring, ledgers, attestation provider, disk,
    telemetry off, the coordinator reachable (sites) or the port free (coordinator). Exit 1 on any FAIL.
    """
    from rich.table import Table
    from rich.text import Text

    from fedsecure.launch.doctor import run_checks

    checks = run_checks(config)
    table = Table(title=f"fedsecure doctor: {config}", title_justify="left")
    for col in ("status", "check", "detail"):
        table.add_column(col, overflow="fold")
    colors = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
    for c in checks:
        table.add_row(Text(c.status, style=colors[c.status]), Text(c.name), Text(c.detail))
    console.print(table)
    failed = [c for c in checks if c.status == "FAIL"]
    console.print(f"{len(failed)} failed, {sum(c.status == 'WARN' for c in checks)} warnings, "
                  f"{sum(c.status == 'OK' for c in checks)} OK", highlight=False)
    if failed:
        raise typer.Exit(code=1)
