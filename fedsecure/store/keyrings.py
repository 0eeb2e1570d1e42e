"""Which keyring each party uses, and where: the coordinator's and each site's are separate."""

from __future__ import annotations

from pathlib import Path

from fedsecure.config import SiteSettings, StorageSettings
from fedsecure.crypto.keys import KeyRing, load_keyring


def coordinator_keyring(storage: StorageSettings, run_dir: str | Path) -> KeyRing | None:
    """The coordinator's keyring (None when it does not seal): ``storage.keyring``, else
    ``<run_dir>/keys/coordinator.keyring.json`` (created on first use: a simulation convenience).
    """
    if not storage.seal:
        return None
    return load_keyring(storage.key_provider, keyring_path=storage.keyring,
                        default_path=Path(run_dir) / "keys" / "coordinator.keyring.json",
                        key_command=storage.key_command)


def default_site_keyring_path(state_dir: str | Path, name: str) -> Path:
    """Where a site's keyring lives unless ``site.storage.keyring`` says otherwise: beside its state folder,
    ``<state_dir>/../keys/<name>.keyring.json``.
    """
    return Path(str(state_dir)).parent / "keys" / f"{name}.keyring.json"


def site_keyring(site: SiteSettings) -> KeyRing | None:
    """A site's keyring, from its own settings: ``site.storage.keyring``, else
    ``<state_dir>/../keys/<site>.keyring.json``. The coordinator's storage settings never apply to a site.
    """
    st = site.storage
    if not st.seal:
        return None
    default = default_site_keyring_path(str(site.state_dir), str(site.name))
    return load_keyring(st.key_provider, keyring_path=st.keyring, default_path=default, key_command=st.key_command)
