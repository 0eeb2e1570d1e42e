"""``fedsecure ledger``: a site's privacy ledgers, for a compliance officer (site side).

``show`` lists every entry of each dataset ledger and which runs spent the dataset's budget and how much;
``verify`` checks the hash chain and recomputes every recorded ε. Both read a ledger through
:func:`fedsecure.privacy.ledger.open_ledger_file`, the same verifier a site runs before it trains.

A sealed ledger (the default) opens with its site's keyring, found as the site finds it: the keyring the
site's node config names (``<state>/node-config.toml``, written by ``fedsecure client``), else
``<state>/../keys/<site>.keyring.json`` (a deployed site's default; in a simulation run directory the
sites' keyrings are in ``<run>/sites/keys/``); ``--keyring`` overrides both.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.crypto.keys import KeyRing
from fedsecure.errors import FedSecureError, KeyMaterialError, LedgerError

NODE_CONFIG = "node-config.toml"  # written into a deployed site's state directory by `fedsecure client`
_WHERE = ("a site's state directory, a simulation run directory, or a privacy-ledger-*.jsonl[.sealed] file")


def find_ledgers(path: Path) -> list[Path]:
    """The ledger files ``path`` names: the file itself, the ledgers in a site's state directory, in each site
    folder of a state root (``site.state_dir`` of a simulation), or in ``<run>/sites/*/`` of a run directory (or
    under the ``site.state_dir`` its ``config.yaml`` records, when the run kept its ledgers there).
    """
    from fedsecure.privacy.ledger import is_ledger_file, ledger_files

    if not path.exists():
        raise LedgerError(f"{path} does not exist. Fix: pass {_WHERE}.")
    if path.is_file():
        if not is_ledger_file(path):
            raise LedgerError(f"{path} is not a privacy ledger. Fix: pass {_WHERE}.")
        return [path]
    persisted = _persisted_state_root(path)
    for folders in ([path], sorted(path.iterdir()), sorted((path / "sites").glob("*")),
                    sorted(persisted.glob("*")) if persisted else []):
        found = [f for d in folders if d.is_dir() for f in ledger_files(d)]
        if found:
            return found
    if persisted:
        raise LedgerError(f"no privacy ledger in {path}, nor under {persisted} (its site.state_dir). Fix: pass the "
                          "state directory the sites used.")
    raise LedgerError(f"no privacy ledger (privacy-ledger-*.jsonl or .jsonl.sealed) in {path}, its folders or "
                      f"{path / 'sites'}. Fix: pass {_WHERE}.")


def _persisted_state_root(run_dir: Path) -> Path | None:
    """The ``site.state_dir`` a simulation run recorded in its ``config.yaml`` (its ledgers live there), if any."""
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        site = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("site") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    root = site.get("state_dir") if isinstance(site, dict) else None
    return Path(root) if isinstance(root, str) and root else None


def _site_default(state: Path) -> tuple[Path | None, KeyRing | None]:
    """The keyring file the site of state directory ``state`` uses by default (or the keyring itself, when its
    provider is the environment or a passphrase); the same rule as :func:`fedsecure.store.site_keyring`.
    """
    from fedsecure.store.keyrings import default_site_keyring_path

    node_config = state / NODE_CONFIG
    if not node_config.is_file():  # a simulated site, or a deployed one without its node config at hand
        return default_site_keyring_path(state, state.name), None
    import tomllib

    from fedsecure.config import SiteSettings
    from fedsecure.crypto.keys import load_keyring

    try:
        site = SiteSettings.from_flat(tomllib.loads(node_config.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError and ConfigError are ValueErrors
        raise LedgerError(f"{node_config} cannot be read ({e}). Fix: pass --keyring with the site's keyring "
                          "file.") from None
    st = site.storage
    if st.key_provider == "command":
        raise KeyMaterialError(f"{node_config}: the site's keyring comes from a command (site.storage.key_command), "
                               "which this command does not run. Fix: write the keyring it prints to a 0600 file "
                               "and pass --keyring FILE.")
    default = default_site_keyring_path(str(site.state_dir or state), str(site.name or state.name))
    if st.key_provider in ("env", "passphrase"):
        return None, load_keyring(st.key_provider, keyring_path=st.keyring, default_path=default,
                                  create_default=False)
    return Path(st.keyring) if st.keyring else default, None


class Keyrings:
    """The keyring of each ledger's site: ``--keyring`` when given, else the site's default (loaded once)."""

    def __init__(self, keyring: Path | None) -> None:
        self.keyring = keyring
        self.cache: dict[Path, KeyRing] = {}

    def for_ledger(self, ledger: Path) -> KeyRing | None:
        """None for a plain ledger; the site's keyring for a sealed one, or an error naming the --keyring to pass."""
        from fedsecure.crypto import read_keyring_file
        from fedsecure.crypto.sealed import SUFFIX

        if not ledger.name.endswith(SUFFIX):
            return None
        state = ledger.parent.resolve()
        if state in self.cache:
            return self.cache[state]
        file, ring = (self.keyring, None) if self.keyring else _site_default(state)
        if ring is None:
            if file is None or not file.is_file():
                raise KeyMaterialError(
                    f"privacy ledger {ledger} is sealed and its site's keyring "
                    + (f"{file} does not exist" if self.keyring else f"was not found (looked for {file})")
                    + f". Fix: pass --keyring with the keyring of the site that wrote it (site.storage.keyring in "
                    f"its site.yaml, default <state>/../keys/<site>.keyring.json; in a simulation run directory "
                    f"<run>/sites/keys/{state.name}.keyring.json).")
            ring = read_keyring_file(file)
        self.cache[state] = ring
        return ring


def _open(path: Path, rings: Keyrings):
    from fedsecure.privacy.ledger import open_ledger_file

    return open_ledger_file(path, rings.for_ledger(path))


@friendly
def ledger_show(
    path: Path = typer.Argument(..., help="A site's state directory, a simulation run directory (its sites/*/) "
                                          "or one privacy-ledger-*.jsonl[.sealed] file."),
    keyring: Path | None = typer.Option(None, help="The site's keyring file (default: as the site finds it, "
                                                   "<state>/../keys/<site>.keyring.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an unbounded ε is null)."),
) -> None:
    """List each dataset ledger's entries, the runs that spent its budget, the total spent and what is left.

    Per entry: seq, time, run, round, kind (spend, refusal, non-private), σ, q, steps, ε after, budget and the
    reason of a refusal; per run: the rounds it released or had refused and how much the dataset's ε rose.
    Each ledger is verified first (hash chain, recomputed ε); a tampered one is an error naming the entry.
    """
    import json

    from fedsecure.reports import ledger as report

    rings = Keyrings(keyring)
    docs = [report.document(p, _open(p, rings)) for p in find_ledgers(path)]
    if as_json:
        typer.echo(json.dumps({"ledgers": docs}, indent=2, allow_nan=False))
        return
    for i, doc in enumerate(docs):
        if i:
            console.print()
        for part in report.tables(doc):
            console.print(part, highlight=False)


@friendly
def ledger_verify(
    path: Path = typer.Argument(..., help="A site's state directory, a simulation run directory or one "
                                          "privacy-ledger-*.jsonl[.sealed] file."),
    keyring: Path | None = typer.Option(None, help="The site's keyring file (default: as the site finds it)."),
) -> None:
    """Check each ledger's hash chain and recompute every recorded ε from its history; exit 0 only if all hold."""
    rings = Keyrings(keyring)
    failed: list[str] = []
    for p in find_ledgers(path):
        try:
            led = _open(p, rings)
        except FedSecureError as e:
            failed.append(str(e))
            continue
        typer.echo(f"OK: {p}: {len(led.entries)} entries, hash chain intact, ε recomputed, head {led.head}")
    if failed:
        more = f" ({len(failed) - 1} more ledgers failed too)" if len(failed) > 1 else ""
        raise LedgerError(failed[0] + more)
