"""The coordinator's checkpoint: written after every completed round, read on restart to resume after it.

``<run_dir>/coordinator-state.json`` holds the last completed round, the digest of the configuration
(a changed configuration is refused on resume), the initial held-out loss, the retired sites, the
privacy summary so far, the round history and the client-level DP spends. Version 2 adds the audit
log's anchor: ``audit`` (head and entry count when the checkpoint was written, so a run that crashed
is anchored too) and ``finished`` (written once by the run's last checkpoint: audit head and entries
after ``run.completed``, rounds completed, why it stopped, the final adapter). A finished run is
never resumed. Version-1 checkpoints (no anchor) are still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedsecure._durable import canonical_json
from fedsecure.audit import CHECKPOINT, SUMMARY, tail
from fedsecure.audit import LOG as AUDIT_LOG
from fedsecure.config import SimulationConfig
from fedsecure.errors import ConfigError, FedSecureError
from fedsecure.privacy.accounting import Spend
from fedsecure.store.rundir import RunDir

VERSION = 2


def config_digest(cfg: SimulationConfig) -> str:
    """What must not change between a run and its resumption (everything but where things live)."""
    doc = cfg.to_dict()
    doc.pop("site", None)
    for section, key in (("data", "dir"), ("attestation", "policy"), ("", "runs_dir")):
        (doc.get(section, {}) if section else doc).pop(key, None)
    return hashlib.sha256(canonical_json(doc)).hexdigest()


@dataclass
class Checkpoint:
    """The coordinator's state after ``round``.

    ``audit_head``/``audit_entries`` anchor the audit log (taken from the log on disk when not given);
    ``finished`` is set by the run's last checkpoint (see the module docstring).
    """

    round: int
    config_sha256: str
    initial_eval_loss: float | None = None
    retired: list[str] = field(default_factory=list)
    privacy_sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    client_dp_spends: list[Spend] = field(default_factory=list)
    client_dp_distributed: list[dict[str, Any]] = field(default_factory=list)  # rounds noised at the sites
    audit_head: str | None = None
    audit_entries: int | None = None
    finished: dict[str, Any] | None = None

    def write(self, run_dir: RunDir) -> None:
        """Rewrite the checkpoint atomically."""
        anchor = None
        if self.audit_head is not None and self.audit_entries is not None:
            anchor = {"head": self.audit_head, "entries": self.audit_entries}
        elif (on_disk := tail(run_dir.path / AUDIT_LOG)) is not None:
            anchor = {"head": on_disk[1], "entries": on_disk[0]}
        doc = {"version": VERSION, "round": self.round, "config_sha256": self.config_sha256,
               "initial_eval_loss": self.initial_eval_loss, "retired": sorted(set(self.retired)),
               "privacy_sites": self.privacy_sites, "history": self.history,
               "client_dp_spends": [[s.sigma, s.q, s.steps] for s in self.client_dp_spends],
               "client_dp_distributed": self.client_dp_distributed,
               "audit": anchor, "finished": self.finished}
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
            noised = [dict(r, rho=float(r["rho"])) for r in doc.get("client_dp_distributed", [])]
            version = int(doc.get("version", 1))
            anchor = doc.get("audit") or {}
            if not isinstance(anchor, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FedSecureError(f"{path} is damaged. Fix: restore it from backup, or start the run in a new "
                                 "run directory") from None
        if version > VERSION:
            raise FedSecureError(f"{path} is version {version}, written by a newer fedsecure (this one reads up to "
                                 f"{VERSION}). Fix: resume with the fedsecure release that wrote it")
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
                   history=doc.get("history", []), client_dp_spends=spends, client_dp_distributed=noised,
                   audit_head=anchor.get("head"),
                   audit_entries=anchor.get("entries"), finished=doc.get("finished") or None)


def finished_run(run_dir: RunDir) -> str | None:
    """Why ``run_dir`` cannot be resumed: it holds a finished run (its checkpoint says so, or, for a run from
    before checkpoints recorded it, it has a summary.json); None when it does not. Reads, never writes.
    """
    done: dict[str, Any] | None = None
    try:
        state = json.loads((run_dir.path / CHECKPOINT).read_text())
        done = state.get("finished") if isinstance(state, dict) else None
    except (OSError, ValueError):
        pass  # no checkpoint, or a damaged one: Checkpoint.read says so
    if not isinstance(done, dict) and (run_dir.path / SUMMARY).exists():
        try:
            summary = json.loads((run_dir.path / SUMMARY).read_text())
            done = {"rounds_completed": summary.get("rounds_completed"), "stopped": summary.get("stopped"),
                    "audit_head": (summary.get("attestation") or {}).get("audit_head")}
        except (OSError, ValueError, AttributeError):
            done = {}
    if not isinstance(done, dict):
        return None
    ended = done.get("stopped") or "all rounds done"
    return (f"run directory {run_dir.path} already holds a finished run ({done.get('rounds_completed', '?')} rounds, "
            f"ended: {ended}, audit head {done.get('audit_head') or '?'}). Fix: start a new run with another run "
            "directory (server.run_dir / --run-dir)")


def refuse_unusable(run_dir: RunDir, cfg: SimulationConfig) -> None:
    """Refuse, before anything is written, a run directory the coordinator must not work in: a damaged or newer
    checkpoint, a changed configuration (:meth:`Checkpoint.read`), or a finished run (:func:`finished_run`).
    """
    Checkpoint.read(run_dir, cfg)
    if (why := finished_run(run_dir)) is not None:
        raise FedSecureError(why)
