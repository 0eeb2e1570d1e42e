"""Which keyring each party uses, and where: the coordinator's and each site's are separate."""

from __future__ import annotations

from pathlib import Path

from fedsecure.config import SimulationConfig, SiteSettings
from fedsecure.crypto.keys import KeyRing, load_keyring


def coordinator_keyring(cfg: SimulationConfig, run_dir: str | Path) -> KeyRing | None:
    if not cfg.storage.seal:
        return None
    return load_keyring(cfg.storage.key_provider, keyring_path=cfg.storage.keyring,
                        default_path=Path(run_dir) / "keys" / "coordinator.keyring.json",
                        key_command=cfg.storage.key_command)


def site_keyring(site: SiteSettings) -> KeyRing | None:
    """A site's keyring, from its own settings: ``site.storage.keyring``, else
    ``<state_dir>/../keys/<site>.keyring.json``. The coordinator's storage settings never apply to a site."""
    st = site.storage
    if not st.seal:
        return None
    default = Path(str(site.state_dir)).parent / "keys" / f"{site.name}.keyring.json"
    return load_keyring(st.key_provider, keyring_path=st.keyring, default_path=default, key_command=st.key_command)
