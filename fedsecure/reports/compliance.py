r"""The compliance report of one run, as the coordinator sees it (``fedsecure report RUN_DIR``).

Every figure comes from a file of the run directory: ``summary.json`` (what each site reported: ε from its
ledger, σ, C, q, its ledger head), ``metrics.jsonl`` (each site's release per round), ``audit.log`` (verified
before anything is read from it: attestation, refusals, retirements), ``config.yaml`` and the attestation policy.
Each site's releases of this run are written as dp-accounting ``DpEvent``\\ s and ε is recomputed from them by
dp-accounting; the report shows both figures and headlines the larger. A site's officer should not need to
trust this view: ``fedsecure report --site-state`` builds the same report from the site's own ledgers.

The document (a dict, JSON) is described in ``docs/report-schema.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedsecure.errors import ReportError
from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.reports import compliance_text as text
from fedsecure.reports import evidence as ev
from fedsecure.reports import mechanisms as mech

_ATTESTATION_EVENTS = {"attestation.accepted", "attestation.rejected"}
_SITE_EVENTS = {"site.refused", "site.retired"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} is missing: {path.parent} is not a finished run directory. Fix: pass the run "
                          "directory a `fedsecure simulate` or `fedsecure server` run wrote (it holds summary.json)."
                          ) from None
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}. Fix: restore it from a backup; the run's ledgers at the "
                          "sites still hold every spend (`fedsecure report --site-state`).") from None


def _metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line of a crashed run
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _site(name: str, reported: dict[str, Any], trained: list[dict[str, Any]], refusals: list[dict[str, Any]],
          request_accountant: str) -> dict[str, Any]:
    """One site's section: the figures it reported, its releases, ε recomputed, the δ < 1/N check."""
    accountant = reported.get("accountant") or request_accountant
    history = [(float(m["sigma"]), float(m.get("q", reported.get("q") or 0.0)), int(m.get("dp_steps", m["steps"])))
               for m in trained if m.get("sigma") is not None]
    description = mech.describe(history)
    delta = reported.get("delta")
    records = max((int(m["records"]) for m in trained if m.get("records")), default=None)
    lifetime = reported.get("epsilon_spent")
    lifetime = math.inf if lifetime is None and reported.get("status") in ("exhausted", "non-private") else lifetime
    entries = reported.get("ledger_entries")
    released_here = len(reported.get("rounds_trained", [])) + len(reported.get("refused_rounds", []))
    prior = entries is not None and entries > released_here
    this_run = recomputed = None
    if delta and history:
        recomputed = mech.recompute(description, delta, accountant)
        if prior or lifetime is None:  # this run is not the dataset's whole history: its own ε, by Opacus
            ours = accountant if accountant in ("prv", "rdp") else "prv"
            this_run = epsilon_of([Spend(*h) for h in history], delta, ours)
        else:  # the same releases the site's figure accounts for (its ledger holds nothing else)
            this_run = lifetime
    # the site's claim is checked where this run is the dataset's whole history; else this run's own ε
    claim = this_run if prior or lifetime is None else lifetime
    agree = mech.agreement(claim, recomputed)
    shown = max(x for x in (lifetime, this_run, recomputed, 0.0) if x is not None)
    budget = reported.get("epsilon_budget")
    return {
        "site": name, "dataset_ledger_head": reported.get("dataset_ledger_head"), "ledger_entries": entries,
        "status": reported.get("status"), "retired_reason": reported.get("reason"),
        "records": records,
        "delta": delta, "delta_below_one_over_n": None if not (records and delta) else delta < 1.0 / records,
        "sigma": reported.get("sigma"), "max_grad_norm": reported.get("max_grad_norm"), "q": reported.get("q"),
        "sampling": "Poisson", "steps_this_run": reported.get("steps_this_run"),
        "rounds_trained": reported.get("rounds_trained", []),
        "refused": [{"round": r.get("round"), "reason": r.get("reason"), "event": r.get("event")} for r in refusals],
        "accountant": accountant,
        "epsilon": {"lifetime_reported": ev.finite(lifetime), "this_run": ev.finite(this_run),
                    "this_run_recomputed": ev.finite(recomputed), "earlier_runs": prior,
                    "checked_against": "this_run" if prior or lifetime is None else "lifetime_reported",
                    "relative_difference": agree["relative_difference"],
                    "within_tolerance": agree["within_tolerance"], "shown": ev.finite(shown),
                    "unbounded": math.isinf(shown), "budget": budget,
                    "remaining": None if budget is None or math.isinf(shown) else max(0.0, budget - shown)},
        "mechanism": description,
        "epsilon_by_round": [[int(m["round"]), ev.finite(float(m["epsilon"]))] for m in trained if "epsilon" in m],
    }


def _attestation(run_dir: Path, summary: dict[str, Any], audit_ok: bool, events: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    att = summary.get("attestation") or {}
    if not att.get("enabled"):
        return {"enabled": False, "records": [], "note": "Attestation was off: updates were accepted without "
                "evidence; nothing proves which code or DP settings a site ran."}
    policy = Path(att.get("policy") or run_dir / "attestation-policy.yaml")
    records = []
    for e in (e for e in events if e["event"] in _ATTESTATION_EVENTS):
        records.append({"round": e.get("round"), "site": e.get("site"), "tee": e.get("tee") or e.get("provider"),
                        "measurement": e.get("measurement"), "code_hash": e.get("code_hash"),
                        "dp_config_sha256": e.get("dp_config_sha256"), "verified_at": e.get("time"),
                        "result": "verified" if e["event"] == "attestation.accepted" else
                        f"rejected: {e.get('reason', '')}"})
    software = any(r["tee"] == "software" for r in records)
    note = ("Software evidence was accepted (a development policy): it shows which code and DP settings a site "
            "claims and proves nothing about its platform. A production policy accepts TEE evidence only "
            "(tdx, sev-snp)." if software else "Every accepted update carried hardware TEE evidence.")
    if not audit_ok:
        note = "The audit log failed verification: these attestation records cannot be relied on. " + note
    return {"enabled": True, "policy": str(policy), "policy_sha256": ev.file_sha256(policy), "records": records,
            "software_evidence": software, "note": note}


def _storage(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    storage = config.get("storage") or {}
    seal = bool(storage.get("seal", True))
    keyring = storage.get("keyring")
    ring = Path(keyring) if keyring else run_dir / "keys" / "coordinator.keyring.json"
    adapters = sorted((run_dir / "adapters").glob("*.sealed"))
    return {"sealed": seal, "algorithm": ev.SEAL_ALGORITHM if seal else "none: adapters are stored in the clear",
            "what": "global adapters after each round (adapters/), the coordinator's checkpoint state",
            "keyring": ev.keyring_summary(ring, str(storage.get("key_provider", "file"))),
            "files": ev.sealed_files(adapters)}


def _secure_aggregation(config: dict[str, Any] | None) -> bool:
    """Whether the run's config turned secure aggregation on."""
    sa = ((config or {}).get("federation") or {}).get("secure_aggregation") or {}
    return bool(sa.get("enabled")) if isinstance(sa, dict) else False


def build_run_report(run_dir: str | Path) -> dict[str, Any]:
    """The compliance report of the run in ``run_dir`` (a dict; see docs/report-schema.md).

    Raises:
        ReportError: ``run_dir`` holds no readable ``summary.json``.
    """
    run = Path(run_dir).resolve()
    summary = _read_json(run / "summary.json")
    config = _config(run)
    metrics = _metrics(run / "metrics.jsonl")
    audit = ev.audit_summary(run / "audit.log")
    privacy = summary.get("privacy") or {}
    events = ev.audit_events(run / "audit.log", _ATTESTATION_EVENTS | _SITE_EVENTS)  # one read of the log
    site_events = [e for e in events if e["event"] in _SITE_EVENTS]
    sites = []
    for name, reported in sorted((privacy.get("sites") or {}).items()):
        trained = [m for m in metrics if m.get("site") == name and "steps" in m and m.get("round", 0) > 0]
        refusals = [{**e, "round": e.get("round")} for e in site_events if e.get("site") == name]
        sites.append(_site(name, reported, trained, refusals, privacy.get("accountant", "prv")))
    rounds = summary.get("rounds") or []
    attestation = _attestation(run, summary, audit["verified"], events)
    seeded = (config.get("site") or {}).get("noise_seed") is not None if config else None
    client = privacy.get("client_level") or {"enabled": False}
    checkpoint = run / "coordinator-state.json"
    config_sha = None
    if checkpoint.is_file():
        try:
            config_sha = json.loads(checkpoint.read_text(encoding="utf-8")).get("config_sha256")
        except (OSError, ValueError):
            config_sha = None
    report: dict[str, Any] = {
        "schema": text.SCHEMA, "kind": "run",
        "title": f"Privacy report: run {run.name}",
        "subject": {"run_dir": str(run), "rounds_completed": summary.get("rounds_completed"),
                    "stopped": summary.get("stopped"), "final_adapter": Path(summary.get("final_adapter") or "").name},
        "generated": ev.generated_by(),
        "unit": {"record_level": text.RECORD_UNIT, "neighbouring": text.NEIGHBOURING,
                 "client_level": text.CLIENT_UNIT},
        "guarantees": {"record_level": {"enabled": bool(privacy.get("record_level")),
                                        "accountant": privacy.get("accountant")},
                       "client_level": client},
        "accounting": {"accountant": privacy.get("accountant"), "library": f"opacus {mech.library_version('opacus')}",
                       "independent": mech.method(privacy.get("accountant") or "prv"),
                       "tolerance": mech.TOLERANCE, "absolute_tolerance": mech.ABS_TOLERANCE,
                       "rule": "the larger of the site's figure and the recomputed one is shown"},
        "sites": sites,
        "releases": [{"site": s["site"], "mechanism": s["mechanism"]} for s in sites],
        "series": {"eval_loss": [[h["round"], h.get("eval_loss")] for h in rounds],
                   "bytes": [[h["round"], h.get("bytes_down", 0), h.get("bytes_up", 0)] for h in rounds]},
        "trust_model": text.trust_model(secure_aggregation=_secure_aggregation(config), seeded=seeded,
                                        client_dp=bool(client.get("enabled")),
                                        attested=bool(attestation.get("enabled"))),
        "attestation": attestation,
        "storage": _storage(run, config),
        "integrity": {"audit_log": audit,
                      "ledger_heads": {s["site"]: s["dataset_ledger_head"] for s in sites},
                      "config_sha256": ev.file_sha256(run / "config.yaml"), "run_config_sha256": config_sha,
                      "attestation_policy_sha256": attestation.get("policy_sha256")},
        "regulatory": text.regulatory(), "regulatory_disclaimer": text.DISCLAIMER,
    }
    report["findings"] = findings(report, seeded)
    report["summary"] = plain_summary(report)
    worst = max((s["epsilon"]["shown"] for s in sites if s["epsilon"]["shown"] is not None), default=None)
    report["opendp_registry"] = text.opendp_registry(
        title=report["title"], units=sum(s["records"] or 0 for s in sites) or None, epsilon=worst,
        delta=max((s["delta"] for s in sites if s["delta"]), default=None),
        mechanisms=["Poisson-subsampled Gaussian (DP-SGD, per-record clipping C) at each site"],
        trust=" ".join(report["trust_model"]["who_sees_what"][:2]), accountant=str(privacy.get("accountant")))
    return report


def findings(report: dict[str, Any], seeded: bool | None, *, audit_log: bool = True) -> list[dict[str, str]]:
    """What a reader must know before the figures: failures first (``audit_log=False``: a view without one)."""
    out = []
    audit = report["integrity"]["audit_log"]
    if audit_log and not audit["verified"]:
        out.append(ev.finding("error", f"Audit log: {audit['result']}"))
    if not report["guarantees"]["record_level"]["enabled"]:
        out.append(ev.finding("error", "Record-level DP was OFF: the updates of this run are not private."))
    if seeded:
        out.append(ev.finding("error", text.SEEDED_NOISE))
    for s in report["sites"]:
        e = s["epsilon"]
        if e["unbounded"]:
            out.append(ev.finding("error", f"{s['site']}: its dataset was released without DP; ε is unbounded."))
        elif e["budget"] is not None and e["shown"] is not None and e["shown"] > e["budget"] * (1 + mech.TOLERANCE):
            out.append(ev.finding("error", f"{s['site']}: ε {e['shown']:.4f} exceeds its budget {e['budget']:g}."))
        if e["within_tolerance"] is False:
            out.append(ev.finding("warning", f"{s['site']}: the site's ε and the independent recomputation differ by "
                                  f"{100 * (e['relative_difference'] or 0):+.2f}% (tolerance "
                                  f"{100 * mech.TOLERANCE:.1f}% or {mech.ABS_TOLERANCE:g}); the larger is shown."))
        if s["delta_below_one_over_n"] is False:
            out.append(ev.finding("error", f"{s['site']}: δ = {s['delta']:.1e} is not below 1/N = 1/{s['records']}: "
                                  "the guarantee allows releasing a whole record."))
        if s["refused"]:
            rounds = ", ".join(f"{r['round']} ({r['reason']})" for r in s["refused"])
            out.append(ev.finding("info", f"{s['site']}: {rounds}"))
    if report["attestation"].get("software_evidence"):
        out.append(ev.finding("warning", report["attestation"]["note"]))
    stopped = report["subject"].get("stopped")
    if stopped:
        out.append(ev.finding("warning", f"The run ended early: {stopped}."))
    return out


def plain_summary(report: dict[str, Any]) -> list[str]:
    """The first sentences a reader sees."""
    sites = report["sites"]
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    lines = [f"{len(sites)} hospital sites trained a shared model over {report['subject']['rounds_completed']} "
             "rounds; no patient record left its hospital."]
    if report["guarantees"]["record_level"]["enabled"]:
        shown = [s["epsilon"]["shown"] for s in sites if s["epsilon"]["shown"] is not None]
        budgets = [s["epsilon"]["budget"] for s in sites if s["epsilon"]["budget"] is not None]
        if shown:
            lines.append(f"Each site's training was differentially private per patient document. The largest privacy "
                         f"loss of any site's dataset is ε = {max(shown):.3f} (budgets: "
                         f"{', '.join(sorted({f'{b:g}' for b in budgets})) or 'n/a'}), at δ ≤ "
                         f"{max(s['delta'] or 0 for s in sites):.0e}.")
    else:
        lines.append("Differential privacy was OFF: the shared updates are not private.")
    audit = report["integrity"]["audit_log"]
    lines.append(f"The audit log verified intact ({audit['entries']} entries)." if audit["verified"] else
                 "THE AUDIT LOG FAILED VERIFICATION: do not rely on this report's attestation records.")
    disagree = [s["site"] for s in sites if s["epsilon"]["within_tolerance"] is False]
    if errors:
        lines.append(f"{len(errors)} problem(s) need attention (see Findings).")
    elif disagree:
        lines.append(f"No site exceeded its budget. The independent recomputation differs for {', '.join(disagree)} "
                     "(the larger figure is shown; see Findings).")
    else:
        lines.append("No site exceeded its budget, and dp-accounting's independent recomputation agrees with every "
                     "site's figure.")
    return lines
