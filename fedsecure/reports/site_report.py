"""The compliance report of one site, from its own state (``fedsecure report --site-state DIR``).

A hospital's officer should not have to trust the coordinator: this view reads only the site's state directory
and its keyring. Each dataset ledger is opened through :func:`fedsecure.privacy.ledger.open_ledger_file` (hash
chain and every recorded ε recomputed; a sealed ledger authenticated with the keyring); a ledger that fails is
shown as failed, with the verifier's words, and none of its figures. For each dataset: every run that ever used
it and its share, every release as a mechanism, ε recomputed with dp-accounting over the whole lifetime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedsecure.privacy.ledger import NON_PRIVATE, REFUSAL, SPEND, PrivacyLedger
from fedsecure.reports import compliance_text as text
from fedsecure.reports import evidence as ev
from fedsecure.reports import mechanisms as mech
from fedsecure.reports.compliance import findings as run_findings
from fedsecure.reports.ledger import runs_of, totals_of


def _site_events(state: Path) -> list[dict[str, Any]]:
    out = []
    path = state / "site-events.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                out.append(e)
    return out


def _dataset(path: Path, ledger: PrivacyLedger, site: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    entries = ledger.entries
    totals = totals_of(ledger)
    spends = [e for e in entries if e.kind == SPEND]
    history = [(e.sigma, e.q, e.steps) for e in spends]
    description = mech.describe(history)
    recomputed = (math.inf if totals.non_private else
                  mech.recompute(description, totals.delta, totals.accountant or "prv") if totals.delta else 0.0)
    recorded = totals.epsilon_spent
    agree = mech.agreement(recorded, recomputed)
    shown = max(recorded, recomputed)
    runs = runs_of(ledger)
    run_ids = {u.run_id for u in runs}
    records = max((int(e["records"]) for e in events if e.get("event") == "trained" and e.get("run") in run_ids
                   and e.get("records")), default=None)
    last = spends[-1] if spends else None
    budget = totals.epsilon_budget
    return {
        "site": site, "dataset": ledger.dataset, "ledger": str(path), "sealed": ledger.files.sealed,
        "verified": True, "verification": f"OK: {len(entries)} entries, hash chain intact, every recorded ε recomputed",
        "dataset_ledger_head": ledger.head, "ledger_entries": len(entries),
        "status": "unbounded" if totals.non_private else ("exhausted" if budget is not None and recorded >= budget
                                                          else "active"),
        "retired_reason": None, "records": records, "delta": totals.delta,
        "delta_below_one_over_n": None if not (records and totals.delta) else totals.delta < 1.0 / records,
        "sigma": last.sigma if last else None, "max_grad_norm": last.max_grad_norm if last else None,
        "q": last.q if last else None, "sampling": "Poisson", "steps_this_run": sum(e.steps for e in spends),
        "rounds_trained": [f"{e.run_id}#{e.server_round}" for e in entries if e.kind in (SPEND, NON_PRIVATE)],
        "refused": [{"round": e.server_round, "run": e.run_id, "reason": e.reason, "event": "refusal"}
                    for e in entries if e.kind == REFUSAL],
        "accountant": totals.accountant,
        "epsilon": {"lifetime_reported": ev.finite(recorded), "this_run": None,
                    "this_run_recomputed": ev.finite(recomputed), "earlier_runs": len(runs) > 1,
                    "checked_against": "lifetime_reported", "relative_difference": agree["relative_difference"],
                    "within_tolerance": agree["within_tolerance"], "shown": ev.finite(shown),
                    "unbounded": math.isinf(shown), "budget": budget,
                    "remaining": None if budget is None or math.isinf(shown) else max(0.0, budget - shown)},
        "mechanism": description,
        "epsilon_by_round": [[e.seq, ev.finite(e.epsilon_after)] for e in entries if e.kind == SPEND],
        "releases": [{"seq": e.seq, "time": e.time, "run": e.run_id, "round": e.server_round, "kind": e.kind,
                      "sigma": e.sigma, "q": e.q, "steps": e.steps, "max_grad_norm": e.max_grad_norm,
                      "delta": e.delta, "accountant": e.accountant, "epsilon_after": ev.finite(e.epsilon_after),
                      "reason": e.reason or None} for e in entries],
        "runs": [{"run": u.run_id, "from": u.first, "to": u.last, "rounds": list(u.rounds), "refused": list(u.refused),
                  "non_private": u.non_private, "epsilon_added": ev.finite(u.epsilon_added),
                  "epsilon_after": ev.finite(u.epsilon_after)} for u in runs],
    }


def _failed(path: Path, site: str, error: str) -> dict[str, Any]:
    return {"site": site, "dataset": None, "ledger": str(path), "verified": False,
            "verification": f"FAILED: {error}", "dataset_ledger_head": None, "ledger_entries": None,
            "status": "FAILED VERIFICATION", "records": None, "delta": None, "delta_below_one_over_n": None,
            "sigma": None, "max_grad_norm": None, "q": None, "sampling": "Poisson", "steps_this_run": None,
            "rounds_trained": [], "refused": [], "accountant": None, "retired_reason": None,
            "epsilon": {"lifetime_reported": None, "this_run": None, "this_run_recomputed": None,
                        "earlier_runs": None, "checked_against": None, "relative_difference": None,
                        "within_tolerance": None, "shown": None, "unbounded": False, "budget": None,
                        "remaining": None},
            "mechanism": mech.describe([]), "epsilon_by_round": [], "releases": [], "runs": []}


def build_site_report(state_dir: str | Path, ledgers: list[tuple[Path, PrivacyLedger | str]], *,
                      keyring: Path | None, key_provider: str = "file") -> dict[str, Any]:
    """The report of a site from its state directory and its opened ledgers (a ledger that failed to open is
    given as its error message).
    """
    state = Path(state_dir).resolve()
    site = state.name
    events = _site_events(state)
    rows = [(_failed(p, site, lg) if isinstance(lg, str) else _dataset(p, lg, site, events)) for p, lg in ledgers]
    node_key = state / "attestation" / "node-key.pem"
    node_key_id = None
    if node_key.is_file():
        from fedsecure.crypto.dsse import key_id, load_public_key
        try:
            node_key_id = key_id(load_public_key(node_key))
        except Exception:  # noqa: BLE001 - an unreadable key is reported, not fatal
            node_key_id = "unreadable"
    sealed = sorted(p for p in state.rglob("*.sealed") if p.is_file())
    evals = [e for e in events if e.get("event") == "evaluated"]
    failed = [r for r in rows if not r["verified"]]
    report: dict[str, Any] = {
        "schema": text.SCHEMA, "kind": "site", "title": f"Privacy report: site {site}",
        "subject": {"state_dir": str(state), "site": site, "datasets": len(rows),
                    "rounds_completed": len({(e.get('run'), e.get('round')) for e in evals}), "stopped": None},
        "generated": ev.generated_by(),
        "unit": {"record_level": text.RECORD_UNIT, "neighbouring": text.NEIGHBOURING,
                 "client_level": text.CLIENT_UNIT + " (not accounted at the site: see the run's report)"},
        "guarantees": {"record_level": {"enabled": not any(r["epsilon"]["unbounded"] for r in rows),
                                        "accountant": next((r["accountant"] for r in rows if r["accountant"]), None)},
                       "client_level": {"enabled": False, "note": "a coordinator's guarantee; see the run report"}},
        "accounting": {"accountant": next((r["accountant"] for r in rows if r["accountant"]), None),
                       "library": f"opacus {mech.library_version('opacus')}",
                       "independent": mech.method(next((r["accountant"] for r in rows if r["accountant"]), "prv")),
                       "tolerance": mech.TOLERANCE, "absolute_tolerance": mech.ABS_TOLERANCE,
                       "rule": "the larger of the ledger's figure and the recomputed one is shown"},
        "sites": rows,
        "releases": [{"site": site, "dataset": r["dataset"], "mechanism": r["mechanism"]} for r in rows],
        "series": {"eval_loss": [[f"{str(e.get('run'))[-6:]}#{e.get('round')}", e.get("loss")] for e in evals],
                   "bytes": []},
        "trust_model": text.trust_model(secure_aggregation=False, seeded=None, client_dp=False, attested=True),
        "attestation": {"enabled": node_key.is_file(), "node_key": str(node_key) if node_key.is_file() else None,
                        "node_key_id": node_key_id, "records": [],
                        "note": "The site's node key binds its evidence to each update; the coordinator's run report "
                                "lists which evidence it verified per round."},
        "storage": {"sealed": any(r.get("sealed") for r in rows),
                    "algorithm": ev.SEAL_ALGORITHM,
                    "what": "privacy ledgers, error-feedback residuals, the site's held adapters",
                    "keyring": ev.keyring_summary(keyring, key_provider), "files": ev.sealed_files(sealed)},
        "integrity": {"audit_log": {"present": False, "verified": not failed,
                                    "result": "a site keeps no audit log; its ledgers are its hash-chained record"
                                    if not failed else f"{len(failed)} ledger(s) FAILED verification",
                                    "entries": sum(r["ledger_entries"] or 0 for r in rows)},
                      "ledger_heads": {r["dataset"] or r["ledger"]: r["dataset_ledger_head"] for r in rows},
                      "ledgers": [{"ledger": r["ledger"], "verified": r["verified"], "result": r["verification"]}
                                  for r in rows]},
        "regulatory": text.regulatory(), "regulatory_disclaimer": text.DISCLAIMER,
    }
    report["findings"] = [ev.finding("error", f"Ledger {r['ledger']}: {r['verification']}") for r in failed]
    report["findings"] += run_findings(report, None, audit_log=False)
    report["summary"] = _summary(report)
    worst = [r["epsilon"]["shown"] for r in rows if r["epsilon"]["shown"] is not None]
    report["opendp_registry"] = text.opendp_registry(
        title=report["title"], units=sum(r["records"] or 0 for r in rows) or None,
        epsilon=max(worst) if worst else None, delta=max((r["delta"] for r in rows if r["delta"]), default=None),
        mechanisms=["Poisson-subsampled Gaussian (DP-SGD, per-record clipping C)"],
        trust=report["trust_model"]["who_sees_what"][1], accountant=str(report["accounting"]["accountant"]))
    return report


def _summary(report: dict[str, Any]) -> list[str]:
    rows = report["sites"]
    ok = [r for r in rows if r["verified"]]
    lines = [f"Site {report['subject']['site']} holds {len(rows)} dataset ledger(s); {len(ok)} verified intact."]
    for r in ok:
        e = r["epsilon"]
        spent = "unbounded (released without DP)" if e["unbounded"] else f"ε = {e['shown']:.3f}"
        lines.append(f"Dataset {r['dataset'][:12]}: {len(r['runs'])} run(s) used it; lifetime {spent} of budget "
                     f"{e['budget']:g} at δ = {r['delta'] or 0:.0e}.")
    if len(ok) < len(rows):
        lines.append("A LEDGER FAILED VERIFICATION: its figures are not shown and must not be relied on.")
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    lines.append(f"{len(errors)} problem(s) need attention (see Findings)." if errors else
                 "No dataset exceeded its budget; dp-accounting's independent recomputation agrees.")
    return lines
