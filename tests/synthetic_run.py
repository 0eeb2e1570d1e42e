"""A finished run directory made without training, for the report tests and bench/bench_report.py.

What the coordinator writes at the end of a run (summary.json, metrics.jsonl, a valid hash-chained audit.log
with attestation and refusal events, config.yaml, the checkpoint), with each site's ε computed by fedsecure's
own accountant from the (σ, q, steps) it released, as a site would report it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedsecure._durable import canonical_json, chain_hash
from fedsecure.audit import GENESIS
from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.reports import privacy as privacy_report
from fedsecure.reports import run as run_report

DELTA = 1e-5
STEPS = 16
RECORDS = 384


def _audit(path: Path, events: list[dict[str, Any]]) -> tuple[str, int]:
    head, lines = GENESIS, []
    for i, fields in enumerate(events, 1):
        entry = {"seq": i, "time": f"2026-12-01T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z", **fields, "prev": head}
        entry["hash"] = head = chain_hash(entry)
        lines.append(canonical_json(entry) + b"\n")
    path.write_bytes(b"".join(lines))
    return head, len(events)


def make_run(run_dir: Path, *, sites: int = 3, rounds: int = 3, groups: int = 1, refuse: dict[str, int] | None = None,
             budget: float = 8.0, exact_every: int = 1) -> dict[str, Any]:
    """Write a finished run of ``sites`` × ``rounds`` into ``run_dir`` and return its summary.

    Sites fall into ``groups`` (σ, q) settings; ``refuse`` maps a site to the round it refused (and was retired
    at). ε after each round is the PRV figure every ``exact_every`` rounds and at the last round; between them a
    stand-in (the last figure × sqrt(round / last round)) that only feeds the charts of a large benchmark run.
    """
    refuse = refuse or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "storage": {"seal": True, "keyring": None},
                                                         "site": {"noise_seed": None}}))
    (run_dir / "attestation-policy.yaml").write_text("version: 1\nmeasurements: {software: [aa]}\n")
    metrics, events, history, psites = [], [], [], {}
    cache: dict[tuple[int, int], float] = {}
    for s in range(sites):
        g = s % groups
        name = f"site-{s}"
        sigma, q = 1.0 + 0.1 * g, (32 + 4 * g) / RECORDS
        trained = [r for r in range(1, rounds + 1) if name not in refuse or r < refuse[name]]
        eps: dict[int, float] = {}
        for r in reversed(trained):
            if r % exact_every == 0 or r == trained[-1]:
                if (g, r) not in cache:
                    cache[(g, r)] = epsilon_of([Spend(sigma, q, STEPS * r)], DELTA, "prv")
                eps[r] = cache[(g, r)]
            else:
                eps[r] = eps[trained[-1]] * (r / trained[-1]) ** 0.5
        for r in trained:
            metrics.append({"round": r, "site": name, "train_loss": 6.0 - 0.01 * r, "records": RECORDS,
                            "steps": STEPS, "epsilon": eps[r], "sigma": sigma, "q": q, "dp_steps": STEPS,
                            "delta": DELTA, "max_grad_norm": 1.0, "bytes_up": 4000, "bytes_down": 15000})
        entry = privacy_report.new_site_entry(name)
        last = trained[-1] if trained else 0
        entry.update(epsilon_spent=eps.get(last, 0.0), epsilon_budget=budget, delta=DELTA, sigma=sigma,
                     max_grad_norm=1.0, q=q, steps_this_run=STEPS * len(trained), rounds_trained=trained,
                     accountant="prv", dataset_ledger_head=f"{s:064x}", ledger_entries=len(trained))
        if name in refuse:
            entry.update(status="retired", refused_rounds=[refuse[name]], reason="refused: noise too low",
                         ledger_entries=len(trained) + 1)
        psites[name] = entry
    events.append({"event": "attestation.policy", "source": str(run_dir / "attestation-policy.yaml")})
    for r in range(1, rounds + 1):
        for s in range(sites):
            name = f"site-{s}"
            if name in refuse and r == refuse[name]:
                events.append({"event": "site.refused", "site": name, "round": r,
                               "reason": "privacy.noise_multiplier 0.2 is below site.privacy.min_sigma 0.5"})
            elif name not in refuse or r < refuse[name]:
                events.append({"event": "attestation.accepted", "site": name, "round": r, "tee": "software",
                               "provider": "software", "measurement": "aa" * 32, "code_hash": "bb" * 32,
                               "dp_config_sha256": "cc" * 32, "node": 1000 + s})
        history.append({"round": r, "site": "federation", "eval_loss": 7.0 - 0.1 * r, "sites_ok": sites,
                        "failures": {}, "refused": [], "seconds": 1.0, "bytes_down": 15000 * sites,
                        "bytes_up": 4000 * sites})
    events.append({"event": "run.completed", "rounds_completed": rounds, "stopped": None, "final_adapter": "x"})
    head, count = _audit(run_dir / "audit.log", events)
    rounds_log = [{"round": 0, "site": "federation", "eval_loss": 7.0, "sites_ok": sites, "failures": {},
                   "refused": [], "seconds": 1.0, "bytes_down": 8000 * sites, "bytes_up": 0}, *history]
    with (run_dir / "metrics.jsonl").open("w") as f:
        for m in metrics + rounds_log:
            f.write(json.dumps(m) + "\n")
    privacy = {"unit": privacy_report.UNIT, "record_level": True, "accountant": "prv", "sites": psites,
               "client_level": {"enabled": False}}
    summary = {"run_dir": str(run_dir), "rounds_completed": rounds, "initial_eval_loss": 7.0,
               "final_eval_loss": rounds_log[-1]["eval_loss"], "rounds": rounds_log,
               "final_adapter": str(run_dir / "adapters" / "global-r0003.safetensors.sealed"), "stopped": None,
               "privacy": privacy,
               "attestation": {"enabled": True, "policy": str(run_dir / "attestation-policy.yaml"),
                               "audit_log": str(run_dir / "audit.log"), "audit_head": head, "audit_entries": count,
                               "audit_last_event": "run.completed"}}
    write_summary_files(run_dir, summary)
    return summary


def write_summary_files(run_dir: Path, summary: dict[str, Any]) -> None:
    """What the coordinator's own summary step writes (the baseline of bench/bench_report.py)."""
    (run_dir / "privacy.json").write_text(json.dumps(summary["privacy"], indent=2) + "\n")
    (run_dir / "privacy.md").write_text(privacy_report.markdown(summary["privacy"]))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(run_report.markdown(summary))
