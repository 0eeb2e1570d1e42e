"""The privacy summary of a run: ``privacy.json`` (data) and ``privacy.md`` (for people).

Numbers come from the sites' own replies (each site reports ε from its ledger) and from the
coordinator's client-level accountant. The compliance report builds on this data.
"""

from __future__ import annotations

import math
from typing import Any

UNIT = ("one record (one patient document) of one site's training set; the guarantee covers everything "
        "that left the site, over all rounds of all runs that used that dataset")


def new_site_entry(name: str) -> dict[str, Any]:
    return {"site": name, "status": "active", "epsilon_spent": None, "epsilon_budget": None, "delta": None,
            "sigma": None, "max_grad_norm": None, "q": None, "steps_this_run": 0, "rounds_trained": [],
            "refused_rounds": [], "accountant": None, "dataset_ledger_head": None, "ledger_entries": None,
            "reason": None}


def markdown(privacy: dict[str, Any]) -> str:
    lines = ["# Privacy summary", "", f"Unit of privacy: {privacy['unit']}.", "",
             f"Record-level DP-SGD: {'on' if privacy['record_level'] else 'OFF (updates are not private)'}; "
             f"accountant {privacy['accountant']}.", "",
             "| site | status | ε spent | ε budget | δ | σ | C | q | steps (this run) | rounds trained | refused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in privacy["sites"].values():
        def f(x: Any, fmt: str = ".3f") -> str:
            return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
        lines.append(f"| {s['site']} | {s['status']} | {f(s['epsilon_spent'])} | {f(s['epsilon_budget'], 'g')} | "
                     f"{f(s['delta'], '.1e')} | {f(s['sigma'])} | {f(s['max_grad_norm'], 'g')} | {f(s['q'], '.4f')} | "
                     f"{s['steps_this_run']} | {len(s['rounds_trained'])} | "
                     f"{', '.join(map(str, s['refused_rounds'])) or '-'} |")
    cl = privacy["client_level"]
    lines.append("")
    if cl.get("enabled"):
        lines.append(f"Client-level DP at the coordinator (a separate guarantee, unit: {cl['unit']}): "
                     f"ε = {cl['epsilon']:.3f} at δ = {cl['delta']:.0e} over {cl['rounds']} rounds "
                     f"(clip S = {cl['clip']}, σ_c = {cl['noise_multiplier']}, {cl['accountant']}).")
    else:
        lines.append("Client-level DP at the coordinator: off.")
    return "\n".join(lines) + "\n"
