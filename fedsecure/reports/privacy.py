"""The privacy summary of a run: ``privacy.json`` (data), ``privacy.md`` and the console table (for people).

Numbers come from the sites' own replies (each site reports ε from its ledger) and from the
coordinator's client-level accountant. One set of rows (:func:`rows`) feeds both renderers, so the
file and the console always say the same thing. The compliance report builds on this data.
"""

from __future__ import annotations

import math
from typing import Any

UNIT = ("one record (one patient document) of one site's training set; the guarantee covers everything "
        "that left the site, over all rounds of all runs that used that dataset")
COLUMNS = ("site", "status", "ε spent", "ε budget", "δ", "σ", "C", "q", "steps (this run)", "rounds trained",
           "refused")


def new_site_entry(name: str) -> dict[str, Any]:
    """An empty per-site entry of the summary."""
    return {"site": name, "status": "active", "epsilon_spent": None, "epsilon_budget": None, "delta": None,
            "sigma": None, "max_grad_norm": None, "q": None, "steps_this_run": 0, "rounds_trained": [],
            "refused_rounds": [], "accountant": None, "dataset_ledger_head": None, "ledger_entries": None,
            "reason": None}


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def rows(privacy: dict[str, Any]) -> list[list[str]]:
    """One row of cells (:data:`COLUMNS`) per site."""
    return [[s["site"], s["status"], _fmt(s["epsilon_spent"]), _fmt(s["epsilon_budget"], "g"),
             _fmt(s["delta"], ".1e"), _fmt(s["sigma"]), _fmt(s["max_grad_norm"], "g"), _fmt(s["q"], ".4f"),
             str(s["steps_this_run"]), str(len(s["rounds_trained"])),
             ", ".join(map(str, s["refused_rounds"])) or "-"] for s in privacy["sites"].values()]


def headline(privacy: dict[str, Any]) -> str:
    """What kind of guarantee the table is about."""
    if not privacy["record_level"]:
        return "Record-level DP-SGD: OFF (updates are not private)."
    return f"Record-level DP-SGD, {privacy['accountant']} accountant."


def client_level(privacy: dict[str, Any]) -> str:
    """The client-level guarantee, a separate one, in one sentence."""
    cl = privacy["client_level"]
    if not cl.get("enabled"):
        return "Client-level DP at the coordinator: off."
    if cl.get("per_round"):
        counts = [r["sites_in_sum"] for r in cl["per_round"]]
        return (f"Client-level DP with the noise added at the sites (distributed discrete Gaussian under secure "
                f"aggregation; a separate guarantee, unit: {cl['unit']}): ε = {cl['epsilon']:.3f} at δ = "
                f"{cl['delta']:.0e} over {cl['rounds']} rounds (clip S = {cl['clip']}, σ_c = {cl['noise_multiplier']}, "
                f"zCDP ρ = {cl['zcdp_rho']:.4f}, {min(counts)} to {max(counts)} sites' noise in each sum; "
                f"{cl['trust']}).")
    return (f"Client-level DP at the coordinator (a separate guarantee, unit: {cl['unit']}): ε = {cl['epsilon']:.3f} "
            f"at δ = {cl['delta']:.0e} over {cl['rounds']} rounds (clip S = {cl['clip']}, σ_c = "
            f"{cl['noise_multiplier']}, {cl['accountant']}).")


def markdown(privacy: dict[str, Any], title: str = "# Privacy summary") -> str:
    """``privacy.md``."""
    lines = [title, "", f"Unit of privacy: {privacy['unit']}.", "", headline(privacy), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(privacy)]
    return "\n".join([*lines, "", client_level(privacy)]) + "\n"


def table(privacy: dict[str, Any]):  # -> rich.table.Table
    """The same rows as a rich table, for the console."""
    from rich.table import Table

    t = Table(title=f"Privacy report ({headline(privacy).rstrip('.')})")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("site", "status", "refused") else "right")
    for r in rows(privacy):
        t.add_row(*r)
    return t
