"""``fedsecure certs``: the consortium's CA, the coordinator's certificate, site keys."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import friendly


@friendly
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca.pem/.key, coordinator.pem/.key, sites/<name>/."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                   help="Name or address the coordinator serves (repeatable)."),
    site: list[str] = typer.Option([], "--site", help="A site to create an authentication key for (repeatable)."),
    force: bool = typer.Option(False, help="Replace existing files (every party then needs the new ones)."),
) -> None:
    """Create the consortium CA, the coordinator's TLS certificate and a SuperNode key pair per site."""
    from fedsecure.launch.certs import init

    m = init(out, host, site, force=force)
    typer.echo(f"CA            {m.ca_cert} (key {m.ca_key}: keep it offline)")
    typer.echo(f"coordinator   {m.server_cert} for {', '.join(host)} (key {m.server_key})")
    for name, (priv, pub) in m.sites.items():
        typer.echo(f"site {name:9} {priv} (0600, give to the site) / {pub} (list in server.sites)")


@friendly
def certs_add_site(name: str = typer.Argument(..., help="Site name."),
                   out: Path = typer.Option(..., "--out", help="The folder `certs init` wrote."),
                   force: bool = typer.Option(False, help="Replace an existing key pair.")) -> None:
    """Create one more site's SuperNode authentication key pair."""
    from fedsecure.launch.certs import Material, create_site_key

    m = Material.at(out, [name])
    create_site_key(m, name, force=force)
    priv, pub = m.sites[name]
    typer.echo(f"site {name}: {priv} (0600, give to the site) / {pub} (list in server.sites)")
