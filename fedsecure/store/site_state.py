"""A site's state directory: its ledgers, node key and error-feedback residual, under its own keyring.

One :class:`SiteState` per message: the keyring is loaded once (with the passphrase provider that is
one scrypt run) and the sealed-or-plain choice is made once, for every file the message touches.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from fedsecure.config import SiteSettings
from fedsecure.crypto.keys import KeyRing
from fedsecure.store.files import StateFiles
from fedsecure.store.keyrings import site_keyring

RESIDUAL = "uplink-residual.safetensors"


class SiteState:
    """The state directory of the site ``site`` (``site.state_dir``)."""

    def __init__(self, site: SiteSettings) -> None:
        if not site.state_dir:
            raise ValueError("site.state_dir is not set")
        self.site = site
        self.root = Path(site.state_dir)

    @cached_property
    def ring(self) -> KeyRing | None:
        """The site's keyring, loaded on first use and then kept for this message."""
        return site_keyring(self.site)

    @cached_property
    def files(self) -> StateFiles:
        """The site's files, sealed with its keyring unless its own config turns sealing off."""
        return StateFiles(self.ring, self.site.storage.chunk_size)

    @property
    def node_key(self) -> Path:
        """The site's Ed25519 node key (binds its evidence and signs its updates)."""
        return self.root / "attestation" / "node-key.pem"

    def residual_path(self) -> Path:
        """Where the error-feedback residual lives (in this site's form)."""
        return self.files.path(self.root / RESIDUAL)

    def load_residual(self, run_id: str, template: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The error-feedback residual of ``run_id``, or None (other run, other adapter shape, or none yet)."""
        got = self.files.read_tensors(self.root / RESIDUAL)
        if got is None:
            return None
        state, meta = got
        if meta.get("run") != run_id or {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in
                                                                                    template.items()}:
            return None
        return {k: np.array(v, dtype=np.float32) for k, v in state.items()}

    def save_residual(self, run_id: str, residual: dict[str, np.ndarray]) -> None:
        """Keep the residual for the next round of ``run_id`` (sealed unless the site turned sealing off)."""
        self.files.write_tensors(self.root / RESIDUAL, residual, {"run": run_id,
                                                                 "content-kind": "error-feedback-residual"})
