"""``fedsecure certs``: the consortium's CA, the coordinator's certificate, site keys and their configs."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import friendly

#: the coordinator itself (and a one-machine trial) reaches the SuperLink over loopback: always covered
LOOPBACK = ("localhost", "127.0.0.1")


@friendly
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca.pem/.key, coordinator.pem/.key, coordinator.yaml "
                                                "and sites/<name>/ (auth.key, auth.pub, ca.pem, site.yaml)."),
    host: list[str] = typer.Option([], "--host", help="Name or address the coordinator serves to other machines "
                                                      "(repeatable); localhost and 127.0.0.1 are always included."),
    site: list[str] = typer.Option([], "--site", help="A site to create a key and a site.yaml for (repeatable)."),
    superlink: str = typer.Option("127.0.0.1:9093", help="host:port the sites' site.yaml dial (the coordinator's "
                                                          "name across machines) [site.superlink]."),
    force: bool = typer.Option(False, help="Replace existing files (every party then needs the new ones)."),
) -> None:
    """Create the consortium CA, the coordinator's TLS certificate and config, and per site a SuperNode key
    pair and a ready site.yaml.
    """
    from fedsecure.launch.bundle import write_site_bundle
    from fedsecure.launch.certs import init

    hosts = list(dict.fromkeys([*host, *LOOPBACK]))
    m = init(out, hosts, site, force=force)
    typer.echo(f"CA            {m.ca_cert} (key {m.ca_key}: keep it offline)")
    typer.echo(f"coordinator   {m.server_cert} for {', '.join(hosts)} (key {m.server_key})")
    for i, (name, (priv, pub)) in enumerate(m.sites.items()):
        config = write_site_bundle(m, out, name, i, superlink, force=force)
        typer.echo(f"site {name:9} {priv.parent}/: auth.key (0600), ca.pem, "
                   + ("site.yaml" if config else "site.yaml kept (exists)")
                   + f"; the consortium keeps {pub.name} (server.sites)")
    _coordinator_config(m, out, force)


def _coordinator_config(m, out: Path, force: bool) -> None:  # noqa: ANN001 (a launch.certs.Material)
    from fedsecure.launch.bundle import write_coordinator_config

    written = write_coordinator_config(m, out, force=force)
    if written:
        typer.echo(f"config        {written} (fedsecure server --config {written})")
    else:
        typer.echo(f"config        {out / 'coordinator.yaml'} exists and was kept: list new sites under server.sites "
                   "(or pass --force to rewrite it)")


@friendly
def certs_add_site(name: str = typer.Argument(..., help="Site name."),
                   out: Path = typer.Option(..., "--out", help="The folder `certs init` wrote."),
                   superlink: str = typer.Option("127.0.0.1:9093", help="host:port the site dials "
                                                                         "[site.superlink]."),
                   force: bool = typer.Option(False, help="Replace an existing key pair and site.yaml.")) -> None:
    """Create one more site's SuperNode key pair and site.yaml."""
    from fedsecure.launch.bundle import SERVER_PORT, new_site_index, write_site_bundle
    from fedsecure.launch.certs import Material, create_site_key

    m = Material.at(out, [name])
    index = new_site_index(out, name)
    create_site_key(m, name, force=force)
    priv, pub = m.sites[name]
    config = write_site_bundle(m, out, name, index, superlink, force=force)
    typer.echo(f"site {name}: {priv.parent}/ with auth.key (0600), ca.pem, "
               + (f"site.yaml (runtime port {SERVER_PORT + 1 + index})" if config else "site.yaml kept (exists)")
               + f"; the consortium keeps {pub.name}")
    typer.echo(f"coordinator: add `{name}: {pub.relative_to(out).as_posix()}` under server.sites in "
               f"{out / 'coordinator.yaml'}, then restart `fedsecure server` for the next run")
