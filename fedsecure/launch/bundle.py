"""Ready-to-run deployment configs written beside the key material (``fedsecure certs init|add-site``).

``certs init --out DIR`` writes, besides the keys (:mod:`fedsecure.launch.certs`)::

    DIR/coordinator.yaml           `fedsecure server --config DIR/coordinator.yaml`: TLS material, every site's
                                   auth.pub under server.sites, the run directory DIR/runs/consortium
    DIR/sites/<site>/site.yaml     `fedsecure client --config DIR/sites/<site>/site.yaml`: the site's bundle,
    DIR/sites/<site>/ca.pem        everything the hospital needs but its records (DIR/sites/<site>/ minus
                                   auth.pub is what the consortium hands over)

Every path in them is relative to the file, so the folder can be moved or copied to another machine
as a whole. A site gets its own runtime port (9094, 9095, ...: unique when several run on one host, as
in a trial) and its records at ``DIR/data/site-<i>`` (``fedsecure data synth --sites N --out DIR/data``
makes trial records there; a hospital points ``data_dir`` at its own). Existing configs are never
overwritten unless ``force``: they may hold a site's edited policy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedsecure._durable import atomic_write
from fedsecure.errors import ConfigError
from fedsecure.launch.certs import Material

#: the coordinator's port in generated configs, and the first site runtime port after it
SERVER_PORT = 9093


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def site_yaml(m: Material, out: Path, site: str, index: int, superlink: str) -> str:
    """The text of one site's ``site.yaml`` (paths relative to ``out/sites/<site>/``)."""
    here = out / "sites" / site
    return f"""\
# fedsecure client --config <this file>
# Hospital {site}: a Flower SuperNode that trusts only the consortium CA (ca.pem) and authenticates with
# this site's key (auth.key). Written by `fedsecure certs`; paths are relative to this file.
#
# Everything below is this site's own decision: the coordinator's run config can only ask for LESS
# privacy loss than `privacy:` allows; a looser request is refused and written to this site's ledger.
site:
  name: {site}
  superlink: {superlink}         # the coordinator's host:port
  tls_ca: ca.pem                     # the consortium CA
  auth_key: auth.key                 # 0600; auth.pub stays with the coordinator
  # this hospital's records, train.jsonl and eval.jsonl: they never leave this machine (a trial's come from
  # `fedsecure data synth`)
  data_dir: {_rel(out / 'data' / f'site-{index}', here)}
  state_dir: state                   # privacy ledger, node key, residuals (sealed); keep backups
  runtime_port: {SERVER_PORT + 1 + index}                 # the SuperNode's local port (unique per site on a host)
  dataset_id: null                   # stable ledger key for a dataset that grows (null = content fingerprint)
  metrics:                           # this site's own Prometheus endpoint (its epsilon only, GPU/CPU figures)
    enabled: false
    host: 127.0.0.1                  # no authentication: keep it on loopback or a monitoring network
    port: {9465 + index}                       # unique per site on a host (the coordinator's is 9464)
  privacy:                           # this site's privacy policy: authoritative
    dp_required: true
    epsilon_budget: 3.0              # budget of each dataset over every run that ever uses it
    delta: 1.0e-5                    # must be below 1/N (N = training records)
    min_sigma: 0.5                   # the smallest noise multiplier this site accepts
    max_clip: 10.0                   # the largest per-record clipping bound C
    accountants: [prv, rdp]
  storage:
    seal: true
    key_provider: file               # keyring at keys/{site}.keyring.json beside state/ (0600)
  attestation:
    provider: software               # development only: tdx | sev-snp on a confidential VM
"""


def coordinator_yaml(m: Material, out: Path, sites: list[str]) -> str:
    """The text of ``coordinator.yaml`` for ``sites`` (paths relative to ``out``)."""
    listed = "".join(f"    {s}: {_rel(m.sites[s][1], out)}\n" for s in sites)
    return f"""\
# fedsecure server --config <this file>
# The coordinator: a Flower SuperLink with TLS (consortium CA) and SuperNode authentication, running
# fedsecure's ServerApp. Written by `fedsecure certs init`; paths are relative to this file.
server:
  run_dir: runs/consortium           # adapters, checkpoint, audit log; a new folder starts a new run (--run-dir)
  host: 127.0.0.1                    # 0.0.0.0 to serve sites on other machines
  port: {SERVER_PORT}
  tls_ca: {_rel(m.ca_cert, out)}
  tls_cert: {_rel(m.server_cert, out)}
  tls_key: {_rel(m.server_key, out)}
  sites:                             # the only SuperNode keys that may join
{listed}federation:
  rounds: 3
  min_sites: 1
  round_timeout_s: 3600              # a site that has not answered by then is dropped from the round
  join_timeout_s: 600                # at start, wait this long for every listed site
model:
  preset: deepseek-v3-tiny-clinical   # the shipped pretrained base
privacy:                             # requests: each site's own policy can only be tightened
  epsilon_budget: null               # null = each site's own budget
attestation:
  policy: attestation-policy.yaml    # `fedsecure attest dev-policy --out` this file (development)
"""


def write_site_bundle(m: Material, out: Path, site: str, index: int, superlink: str, *,
                      force: bool = False) -> Path | None:
    """Copy the CA certificate into the site's folder and write its ``site.yaml``; returns the config
    written, or None when one exists and ``force`` is off (it may hold the site's edited policy).
    """
    from fedsecure.launch.deploy_config import _HOSTPORT

    if not _HOSTPORT.match(superlink):
        raise ConfigError(f"--superlink {superlink!r} is not host:port. Fix: e.g. coordinator.example.org:9093.")
    here = out / "sites" / site
    shutil.copyfile(m.ca_cert, here / "ca.pem")
    (here / "ca.pem").chmod(0o644)
    target = here / "site.yaml"
    if target.exists() and not force:
        return None
    atomic_write(target, site_yaml(m, out, site, index, superlink).encode("utf-8"), mode=0o644)
    return target


def write_coordinator_config(m: Material, out: Path, *, force: bool = False) -> Path | None:
    """Write ``coordinator.yaml`` listing every site under ``out/sites``; None when one exists and ``force``
    is off.
    """
    target = out / "coordinator.yaml"
    if target.exists() and not force:
        return None
    sites = sorted(p.name for p in (out / "sites").iterdir() if (p / "auth.pub").is_file())
    full = Material.at(out, sites)
    atomic_write(target, coordinator_yaml(full, out, sites).encode("utf-8"), mode=0o644)
    return target


def new_site_index(out: Path, site: str) -> int:
    """The index a site added later gets (its runtime port and data folder): after every other site's."""
    others = [p for p in (out / "sites").iterdir() if p.is_dir() and p.name != site] if (out / "sites").is_dir() \
        else []
    return len(others)
