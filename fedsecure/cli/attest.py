"""``fedsecure attest`` and ``audit``: TEE evidence and the hash-chained audit log."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import friendly


def _read_evidence(file: Path):
    from fedsecure.attestation.evidence import detect
    from fedsecure.errors import AttestationError

    try:
        data = file.read_bytes()
    except OSError as e:
        raise AttestationError(f"{file}: cannot read it ({e.strerror})") from None
    return detect(data)


@friendly
def attest_inspect(file: Path = typer.Argument(..., help="Evidence: a fedsecure envelope, a TDX quote or an "
                                                         "SEV-SNP report."),
                   as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the parsed fields of a piece of evidence (nothing is verified)."""
    import json

    from fedsecure.attestation.inspect import describe

    fields = describe(_read_evidence(file))
    if as_json:
        typer.echo(json.dumps(fields, indent=2))
        return
    for key, value in fields.items():
        if key == "pck_chain":
            for c in value:
                typer.echo(f"{'certificate':14} {c['subject']}  [{c['not_before'][:10]} .. {c['not_after'][:10]}]")
        else:
            typer.echo(f"{key:14} {value}")


@friendly
def attest_verify(
    file: Path = typer.Argument(..., help="Evidence: a fedsecure envelope, a TDX quote or an SEV-SNP report."),
    policy: Path | None = typer.Option(None, help="Policy file: also check TEE type and measurement."),
    at: str | None = typer.Option(None, help="Verify as of this ISO time (default now), e.g. 2023-07-01T01:00:00Z."),
    report_data: str | None = typer.Option(None, "--report-data", help="Expected report data (hex, 64 bytes)."),
    vcek_dir: Path | None = typer.Option(None, help="SEV-SNP: folder with <chip_id>.der and cert_chain.pem."),
) -> None:
    """Check signatures and certificate chains (and, with --policy, the measurement). Exit 0 only if all hold."""
    import datetime as dt

    from fedsecure.attestation.policy import load_policy
    from fedsecure.attestation.verify import verify
    from fedsecure.errors import AttestationError, ConfigError

    ev = _read_evidence(file)
    when = None
    if at is not None:
        try:
            when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--at {at!r} is not an ISO time. Fix: e.g. --at 2023-07-01T01:00:00Z") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError:
            raise ConfigError("--report-data must be hex") from None
        if len(expected) != 64:
            raise AttestationError(f"--report-data must be 64 bytes (128 hex digits), got {len(expected)}")
    pol = load_policy(policy) if policy else None
    claims = verify(ev, expected, pol, when, vcek_dir=vcek_dir)
    checked = ["signatures", "certificate chain"] + (["report data"] if expected else []) + \
        (["TEE type and measurement (policy)"] if pol else [])
    typer.echo(f"OK: {claims.tee} evidence verified ({', '.join(checked)})")
    typer.echo(f"measurement    {claims.measurement}")
    typer.echo(f"report_data    {claims.report_data}")
    for key in ("root", "version", "tcb", "chip_id"):
        if key in claims.details:
            typer.echo(f"{key:14} {claims.details[key]}")


@friendly
def attest_node_key(config: Path = typer.Option(..., "--config", help="The site's site.yaml.")) -> None:
    """Print the site's node public key (made in its state directory if it has none yet): its roster line."""
    from fedsecure.attestation.providers import load_or_create_ed25519
    from fedsecure.launch.deploy_config import load_site_config
    from fedsecure.secagg.protocol import raw

    site = load_site_config(config)
    key = load_or_create_ed25519(site.state_dir / "attestation" / "node-key.pem")
    typer.echo(f"{site.name}={raw(key.public_key()).hex()}")


@friendly
def attest_roster(out: Path = typer.Option(..., "--out", help="Roster file to write (YAML)."),
                  sites: list[str] = typer.Argument(..., help="NAME=HEX, one per site: what `fedsecure attest "
                                                    "node-key` printed at each site."),
                  force: bool = typer.Option(False, help="Overwrite an existing file.")) -> None:
    """Write the consortium's secure-aggregation roster (site name -> node public key) from the sites' lines."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedsecure.errors import ConfigError, KeyMaterialError
    from fedsecure.secagg.roster import write_roster

    if out.exists() and not force:
        raise KeyMaterialError(f"{out} already exists. Fix: pass --force to replace it")
    keys = {}
    for item in sites:
        name, _, hexkey = item.partition("=")
        try:
            keys[name] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey))
        except ValueError:
            raise ConfigError(f"{item!r} is not NAME=HEX with a 32-byte Ed25519 public key. Fix: paste the line "
                              "`fedsecure attest node-key --config site.yaml` printed at that site") from None
        if not name:
            raise ConfigError(f"{item!r} has no site name before '='")
    write_roster(out, keys)
    typer.echo(f"wrote {out} ({len(keys)} sites); give every site and the coordinator a copy")


@friendly
def attest_code_hash() -> None:
    """Print this build's code hash (what a policy's 'code' list approves)."""
    from fedsecure.attestation.evidence import code_hash

    typer.echo(code_hash())


@friendly
def attest_dev_policy(out: Path = typer.Option(..., "--out", help="Policy file to write."),
                      epsilon_budget: float = typer.Option(3.0, help="min_dp.epsilon_budget."),
                      delta: float = typer.Option(1e-5, help="min_dp.delta."),
                      force: bool = typer.Option(False, help="Overwrite an existing file.")) -> None:
    """Write a development policy: software evidence from this build only (never for real patient data)."""
    from fedsecure._durable import atomic_write
    from fedsecure.attestation.evidence import code_hash
    from fedsecure.attestation.policy import MinDP, Policy
    from fedsecure.errors import KeyMaterialError

    if out.exists() and not force:
        raise KeyMaterialError(f"{out} already exists. Fix: pass --force to replace it")
    policy = Policy(measurements={"software": (code_hash(),)}, code=(code_hash(),),
                    min_dp=MinDP(epsilon_budget=epsilon_budget, delta=delta), source="fedsecure attest dev-policy")
    atomic_write(out, ("# DEVELOPMENT ONLY: accepts software evidence, which proves nothing about the platform.\n"
                       + policy.to_yaml()).encode(), mode=0o644)
    typer.echo(f"wrote {out} (software evidence from code {code_hash()[:16]}...; development only)")


@friendly
def audit_verify(
    file: Path = typer.Argument(..., help="An audit.log from a run directory."),
    expect_head: str | None = typer.Option(None, "--expect-head", help="The head the log must end with (64 hex "
                                           "digits), recorded elsewhere: a signed report, a copy of summary.json."),
    no_anchor: bool = typer.Option(False, "--no-anchor", help="Do not compare with the heads recorded in the run "
                                   "directory (summary.json, coordinator-state.json)."),
) -> None:
    """Check the audit log's hash chain and compare its end with the heads recorded beside it (a cut or replaced
    log fails); prints the number of entries, the head and what it matched.
    """
    from fedsecure.audit import expected_head, verify_anchored

    expect = expected_head(expect_head) if expect_head is not None else None
    typer.echo(verify_anchored(file, expect=expect, recorded=not no_anchor).line())
