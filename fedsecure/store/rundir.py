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
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsecure._durable import append_line, atomic_write
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK, SUFFIX
from fedsecure.errors import FedSecureError
from fedsecure.model.adapter import ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION
from fedsecure.store.files import StateFiles


def new_run_id() -> str:
    """A run id: local time plus 24 random bits (``20261129-114422-2409d7``)."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Files of one run. Appends are flushed and fsynced, so a crash loses at most one line."""

    def __init__(self, path: str | Path, ring: KeyRing | None = None, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.path = Path(path)
        self.files = StateFiles(ring, chunk_size)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "adapters").mkdir(exist_ok=True)
        except OSError as e:
            raise FedSecureError(f"cannot create the run directory {self.path} ({e.strerror or e}): a file stands "
                                 "in the way or the folder is not writable. Fix: choose another --runs-dir / "
                                 "--run-dir.") from None

    @property
    def ring(self) -> KeyRing | None:
        """The coordinator's keyring (None when the run is not sealed)."""
        return self.files.ring

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``."""
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> Path:
        """Write the resolved configuration as ``config.yaml``."""
        return self.write_file("config.yaml", yaml.safe_dump(config, sort_keys=False))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (fsynced)."""
        append_line(self.metrics_path, (json.dumps(record, sort_keys=False) + "\n").encode(), mode=0o644)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl``."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def _plain_adapter(self, server_round: int) -> Path:
        return self.path / "adapters" / f"global-r{server_round:04d}.safetensors"

    def adapter_path(self, server_round: int) -> Path:
        """Where the global adapter after ``server_round`` is written."""
        return self.files.path(self._plain_adapter(server_round))

    def save_global_adapter(self, server_round: int, state: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
        """Write the global adapter after ``server_round`` (sealed with the coordinator's key unless sealing is off)."""
        meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "round": str(server_round), **meta}
        return self.files.write_tensors(self._plain_adapter(server_round), state, meta)

    def load_global_adapter(self, server_round: int) -> dict[str, np.ndarray]:
        """The global adapter after ``server_round`` (a run written with sealing off opens either way)."""
        plain = self._plain_adapter(server_round)
        got = self.files.read_tensors(plain)
        if got is None and self.files.sealed:
            got = StateFiles(None).read_tensors(plain)
        if got is None:
            if self.files.other_form(plain).exists():
                raise FedSecureError(f"{self.files.other_form(plain)} is sealed; open the run with its keyring "
                                     "(storage.keyring).")
            raise FedSecureError(f"{self.files.path(plain)} does not exist. Fix: restore adapters/ from backup.")
        return got[0]

    def latest_round(self) -> int | None:
        """The last round whose global adapter is on disk."""
        rounds = sorted(int(p.name.split("-r")[1][:4]) for p in (self.path / "adapters").glob("global-r*.safetensors*")
                        if not p.name.endswith(".tmp"))
        return rounds[-1] if rounds else None

    def write_summary(self, summary: dict[str, Any], markdown: str) -> None:
        """Write ``summary.json`` and ``summary.md``."""
        self.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
        self.write_file("summary.md", markdown)

    def write_file(self, name: str, text: str) -> Path:
        """Write a text file of the run (no weights: readable by the operator), atomically."""
        return atomic_write(self.path / name, text.encode("utf-8"), mode=0o644)

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``."""
        return json.loads((self.path / "summary.json").read_text())


#: the coordinator's fatal error, for the process that launched it (the ServerApp runs under Flower, whose log
#: would otherwise be the only place it appears)
FAILURE = "coordinator-error.json"


def write_failure(run_dir: str | Path, error: BaseException) -> Path | None:
    """Record why the coordinator stopped (one line: the message a FedSecureError carries, or the exception's
    type and text); returns the file, or None when the run directory cannot be written either.
    """
    message = str(error) if isinstance(error, FedSecureError) else f"{type(error).__name__}: {error}"
    doc = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "error": message}
    try:
        return atomic_write(Path(run_dir) / FAILURE, (json.dumps(doc) + "\n").encode("utf-8"), mode=0o644)
    except OSError:
        return None


def read_failure(run_dir: str | Path, since: float = 0.0) -> str | None:
    """The coordinator's recorded fatal error, if one was written at or after ``since`` (a Unix time)."""
    path = Path(run_dir) / FAILURE
    try:
        if path.stat().st_mtime < since:
            return None
        return str(json.loads(path.read_text(encoding="utf-8"))["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


__all__ = ["FAILURE", "SUFFIX", "RunDir", "new_run_id", "read_failure", "write_failure"]
