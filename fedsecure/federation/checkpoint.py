"""The coordinator's checkpoint: written after every completed round, read on restart to resume after it.

``<run_dir>/coordinator-state.json`` holds the last completed round, the digest of the configuration
(a changed configuration is refused on resume), the initial held-out loss, the retired sites, the
privacy summary so far, the round history and the client-level DP spends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedsecure._durable import canonical_json
from fedsecure.config import SimulationConfig
from fedsecure.errors import ConfigError, FedSecureError
from fedsecure.privacy.accounting import Spend
from fedsecure.store.rundir import RunDir

CHECKPOINT = "coordinator-state.json"


def config_digest(cfg: SimulationConfig) -> str:
    """What must not change between a run and its resumption (everything but where things live)."""
    doc = cfg.to_dict()
    doc.pop("site", None)
    for section, key in (("data", "dir"), ("attestation", "policy"), ("", "runs_dir")):
        (doc.get(section, {}) if section else doc).pop(key, None)
    return hashlib.sha256(canonical_json(doc)).hexdigest()


@dataclass
class Checkpoint:
    """The coordinator's state after ``round``."""

    round: int
    config_sha256: str
    initial_eval_loss: float | None = None
    retired: list[str] = field(default_factory=list)
    privacy_sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    client_dp_spends: list[Spend] = field(default_factory=list)

    def write(self, run_dir: RunDir) -> None:
        """Rewrite the checkpoint atomically."""
        doc = {"version": 1, "round": self.round, "config_sha256": self.config_sha256,
               "initial_eval_loss": self.initial_eval_loss, "retired": sorted(set(self.retired)),
               "privacy_sites": self.privacy_sites, "history": self.history,
               "client_dp_spends": [[s.sigma, s.q, s.steps] for s in self.client_dp_spends]}
        run_dir.write_file(CHECKPOINT, json.dumps(doc, indent=1) + "\n")

    @classmethod
    def read(cls, run_dir: RunDir, cfg: SimulationConfig) -> Checkpoint | None:
        """The checkpoint of ``run_dir``, checked against ``cfg`` and the adapters on disk; None for a fresh run."""
        path = run_dir.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            last = int(doc["round"])
            spends = [Spend(float(a), float(b), int(c)) for a, b, c in doc.get("client_dp_spends", [])]
        except (ValueError, KeyError, TypeError):
            raise FedSecureError(f"{path} is damaged. Fix: restore it from backup, or start the run in a new "
                                 "run directory") from None
        if doc.get("config_sha256") != config_digest(cfg):
            raise ConfigError(f"{run_dir.path} holds a run with a different configuration (rounds, model, "
                              "privacy, transport or attestation settings changed). Fix: resume with the same "
                              "config, or use a new run directory")
        latest = run_dir.latest_round()
        if latest is None or latest < last:
            raise FedSecureError(f"{path} says round {last} completed but its global adapter is missing. Fix: "
                                 "restore adapters/ from backup")
        return cls(round=last, config_sha256=doc["config_sha256"], initial_eval_loss=doc.get("initial_eval_loss"),
                   retired=list(doc.get("retired", [])), privacy_sites=doc.get("privacy_sites", {}),
                   history=doc.get("history", []), client_dp_spends=spends)
