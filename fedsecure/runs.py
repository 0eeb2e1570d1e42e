"""The run directory: ``runs/<run-id>/`` with the resolved config, metrics and adapters.

Layout::

    config.yaml                 resolved configuration of the run
    metrics.jsonl               one JSON object per (round, site), plus one per round for the federation
    adapters/global-r0003.safetensors.sealed   global LoRA adapter after each round (round 0 = initial),
                                        sealed with the coordinator's key (plain .safetensors if sealing is off)
    summary.json / summary.md   written when the run ends
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK, SUFFIX
from fedsecure.crypto.tensors import open_tensors, seal_tensors
from fedsecure.errors import FedSecureError
from fedsecure.fsutil import atomic_write
from fedsecure.model.adapter import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, load_adapter_file, save_adapter_file


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Files of one run. Appends are flushed and fsynced, so a crash loses at most one line."""

    def __init__(self, path: str | Path, ring: KeyRing | None = None, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.path = Path(path)
        self.ring = ring
        self.chunk_size = chunk_size
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "adapters").mkdir(exist_ok=True)
        except OSError as e:
            raise FedSecureError(f"cannot create the run directory {self.path} ({e.strerror or e}): a file stands "
                                 "in the way or the folder is not writable. Fix: choose another --runs-dir / "
                                 "--run-dir.") from None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> Path:
        p = self.path / "config.yaml"
        _atomic_write(p, yaml.safe_dump(config, sort_keys=False).encode())
        return p

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def adapter_path(self, server_round: int) -> Path:
        plain = self.path / "adapters" / f"global-r{server_round:04d}.safetensors"
        return plain.with_name(plain.name + SUFFIX) if self.ring else plain

    def save_global_adapter(self, server_round: int, state: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
        meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "round": str(server_round), **meta}
        if self.ring is None:
            return save_adapter_file(self.adapter_path(server_round), state, meta)
        return seal_tensors(self.adapter_path(server_round), state, self.ring, meta, self.chunk_size)

    def load_global_adapter(self, server_round: int) -> dict[str, np.ndarray]:
        plain = self.path / "adapters" / f"global-r{server_round:04d}.safetensors"
        sealed = plain.with_name(plain.name + SUFFIX)
        if sealed.exists():
            if self.ring is None:
                raise FedSecureError(f"{sealed} is sealed; open the run with its keyring (storage.keyring).")
            return open_tensors(sealed, self.ring)[0]
        return load_adapter_file(plain)[0]

    def latest_round(self) -> int | None:
        rounds = sorted(int(p.name.split("-r")[1][:4]) for p in (self.path / "adapters").glob("global-r*.safetensors*")
                        if not p.name.endswith(".tmp"))
        return rounds[-1] if rounds else None

    def write_summary(self, summary: dict[str, Any], markdown: str) -> None:
        _atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        _atomic_write(self.path / "summary.md", markdown.encode())

    def write_file(self, name: str, text: str) -> Path:
        p = self.path / name
        _atomic_write(p, text.encode("utf-8"))
        return p

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o644)  # config and summaries hold no weights
