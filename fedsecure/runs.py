"""The run directory: ``runs/<run-id>/`` with the resolved config, metrics and adapters.

Layout::

    config.yaml                 resolved configuration of the run
    metrics.jsonl               one JSON object per (round, site), plus one per round for the federation
    adapters/global-r0003.safetensors   global LoRA adapter after each round (round 0 = initial)
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

from fedsecure.model.adapter import load_adapter_file, save_adapter_file


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Files of one run. Appends are flushed and fsynced, so a crash loses at most one line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "adapters").mkdir(exist_ok=True)

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
        return self.path / "adapters" / f"global-r{server_round:04d}.safetensors"

    def save_global_adapter(self, server_round: int, state: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
        return save_adapter_file(self.adapter_path(server_round), state, {"round": str(server_round), **meta})

    def load_global_adapter(self, server_round: int) -> dict[str, np.ndarray]:
        return load_adapter_file(self.adapter_path(server_round))[0]

    def latest_round(self) -> int | None:
        rounds = sorted(int(p.stem.split("-r")[-1]) for p in (self.path / "adapters").glob("global-r*.safetensors"))
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
