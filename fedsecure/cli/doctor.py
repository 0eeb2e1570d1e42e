"""``fedsecure doctor``: check a site's or the coordinator's deployment, and a site's machine, before starting it
(changes nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly


@friendly
def doctor_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="A site's site.yaml or the coordinator's "
                                                                   "coordinator.yaml; none: this machine only."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON (for automation)."),
) -> None:
    """Pre-flight check. A site's config: certificates, key file modes, keyring, ledgers, attestation provider,
    disk, telemetry off, the coordinator reachable; then this machine: CPU cores and NUMA nodes, GPUs (memory,
    power limit, temperature, ECC, NVLink and P2P), RDMA ports and their GID types, nvidia-peermem, NCCL and
    torch versions, /dev/shm, the memlock limit, cores per GPU, and the nccl profile to use. The coordinator's
    config: its own checks. Exit 1 on any FAIL.
    """
    from fedsecure.launch.doctor import run_checks, site_settings_of
    from fedsecure.launch.machine import machine_checks

    checks, site, machine = [], None, None
    if config is not None:
        checks = run_checks(config)
        site = site_settings_of(config)
    if config is None or site is not None:
        machine = machine_checks(site)
        checks += machine.checks
    failed = [c for c in checks if c.status == "FAIL"]
    if as_json:
        doc = {"checks": [{"status": c.status, "name": c.name, "detail": c.detail} for c in checks],
               "failed": len(failed), "warnings": sum(c.status == "WARN" for c in checks)}
        if machine is not None:
            doc["nccl"] = {"profile": machine.profile, "ib_gid_index": machine.gid_index, "gpus": machine.gpus}
        print(json.dumps(doc, indent=1))
    else:
        _table(checks, config)
    if failed:
        raise typer.Exit(code=1)


def _table(checks: list, config: Path | None) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"fedsecure doctor: {config or 'this machine'}", title_justify="left")
    for col in ("status", "check", "detail"):
        table.add_column(col, overflow="fold")
    colors = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
    for c in checks:
        table.add_row(Text(c.status, style=colors[c.status]), Text(c.name), Text(c.detail))
    console.print(table)
    console.print(f"{sum(c.status == 'FAIL' for c in checks)} failed, {sum(c.status == 'WARN' for c in checks)} "
                  f"warnings, {sum(c.status == 'OK' for c in checks)} OK", highlight=False)
