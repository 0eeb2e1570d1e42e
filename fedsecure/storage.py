"""Which keyring each party uses, and where: the coordinator's and each site's are separate."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsecure.config import SimulationConfig
from fedsecure.crypto.keys import KeyRing, load_keyring

NODE_KEYRING = "keyring"  # node config: the site's keyring file (file provider)


def coordinator_keyring(cfg: SimulationConfig, run_dir: str | Path) -> KeyRing | None:
    if not cfg.storage.seal:
        return None
    return load_keyring(cfg.storage.key_provider, keyring_path=cfg.storage.keyring,
                        default_path=Path(run_dir) / "keys" / "coordinator.keyring.json",
                        key_command=cfg.storage.key_command)


def site_keyring(cfg: SimulationConfig, site_state_dir: str | Path, name: str,
                 node_config: Mapping[str, Any] | None = None) -> KeyRing | None:
    """A site's keyring: its node config's, else ``<state root>/keys/<site>.keyring.json``.

    The coordinator's ``storage.keyring`` is never used for a site: sites hold their own keys.
    """
    if not cfg.storage.seal:
        return None
    node_config = node_config or {}
    explicit = node_config.get(NODE_KEYRING)
    default = Path(site_state_dir).parent / "keys" / f"{name}.keyring.json"
    return load_keyring(cfg.storage.key_provider, keyring_path=str(explicit) if explicit else None,
                        default_path=default, key_command=cfg.storage.key_command)
