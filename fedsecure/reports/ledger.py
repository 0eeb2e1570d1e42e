"""A privacy ledger for people: every entry, which runs spent the dataset's budget and how much, what is left.

``fedsecure ledger show`` renders this document (a table per ledger, or ``--json``). The ledger itself
is read and verified by :func:`fedsecure.privacy.ledger.open_ledger_file` (hash chain and recomputed ε)
before anything here looks at it; this module only adds up what the verified entries say.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.privacy.ledger import NON_PRIVATE, REFUSAL, SPEND, PrivacyLedger

ENTRY_COLUMNS = ("seq", "time (UTC)", "run #", "round", "kind", "σ", "q", "steps", "ε after", "budget", "reason")
RUN_COLUMNS = ("#", "run", "from (UTC)", "to (UTC)", "released", "refused", "ε added", "ε after")

@dataclass(frozen=True)
class RunUse:
    """What one run did with a dataset, from the dataset's ledger."""

    run_id: str
    first: str  # time of the run's first entry
    last: str  # time of its last entry
    rounds: tuple[int, ...]  # rounds released (DP spends and non-private releases)
    refused: tuple[int, ...]  # rounds the site refused
    non_private: bool  # the run trained this dataset without DP (its ε is unbounded from then on)
    epsilon_added: float  # how much the dataset's ε rose over this run's entries (inf after a non-private release)
    epsilon_after: float | None  # the dataset's ε recorded after the run's last entry (None: unbounded)


@dataclass(frozen=True)
class LedgerTotals:
    """A dataset's budget as its site counts it: ε spent over every run, the budget, what is left."""

    entries: int
    spends: int
    refusals: int
    non_private: int
    epsilon_spent: float  # inf once the dataset was released without DP
    epsilon_budget: float | None  # of the last entry (None for an empty ledger)
    delta: float | None  # of the last spend
    accountant: str | None  # of the last spend
    epsilon_left: float | None  # max(0, budget - spent)


def entry_epsilon_added(ledger: PrivacyLedger) -> list[float]:
    """Per entry, how much it raised the dataset's ε (0 for a refusal, inf for a non-private release): its recorded
    ε minus the ε of the spends before it, both at the entry's own δ and accountant. ε does not add up across
    entries (composition is not a sum), so this is each entry's share of the rise, not a separate ε.
    """
    added: list[float] = []
    before: list[Spend] = []
    prev: tuple[float, str, float] | None = None  # (delta, accountant, epsilon_after) of the previous spend
    for e in ledger.entries:
        if e.kind == NON_PRIVATE:
            added.append(math.inf)
        elif e.kind == SPEND and e.epsilon_after is not None:
            if prev is not None and prev[:2] == (e.delta, e.accountant):
                base = prev[2]
            else:
                base = epsilon_of(before, e.delta, e.accountant) if before else 0.0
            added.append(max(0.0, e.epsilon_after - base))
            prev = (e.delta, e.accountant, e.epsilon_after)
            before.append(e.spend)
        else:
            added.append(0.0)
    return added


def runs_of(ledger: PrivacyLedger) -> list[RunUse]:
    """Which runs used this dataset (in the order they first did) and how much of its ε each one consumed."""
    added = entry_epsilon_added(ledger)
    order: dict[str, list[int]] = {}
    for i, e in enumerate(ledger.entries):
        order.setdefault(e.run_id, []).append(i)
    uses = []
    for run_id, idx in order.items():
        mine = [ledger.entries[i] for i in idx]
        released = sorted({e.server_round for e in mine if e.kind in (SPEND, NON_PRIVATE)})
        uses.append(RunUse(run_id=run_id, first=mine[0].time, last=mine[-1].time, rounds=tuple(released),
                           refused=tuple(sorted({e.server_round for e in mine if e.kind == REFUSAL})),
                           non_private=any(e.kind == NON_PRIVATE for e in mine),
                           epsilon_added=sum(added[i] for i in idx), epsilon_after=_recorded_after(ledger, idx[-1])))
    return uses


def _recorded_after(ledger: PrivacyLedger, index: int) -> float | None:
    """The dataset's ε as recorded after entry ``index`` (None once it is unbounded)."""
    upto = ledger.entries[: index + 1]
    if any(e.kind == NON_PRIVATE for e in upto):
        return None
    spent = [e.epsilon_after for e in upto if e.kind == SPEND]
    return spent[-1] if spent else 0.0


def totals_of(ledger: PrivacyLedger) -> LedgerTotals:
    """ε spent over every run (as the site enforces it: :meth:`PrivacyLedger.epsilon` at the last spend's δ and
    accountant), the budget of the last entry and what is left of it.
    """
    entries = ledger.entries
    last_spend = next((e for e in reversed(entries) if e.kind == SPEND), None)
    if any(e.kind == NON_PRIVATE for e in entries):
        spent = math.inf
    elif last_spend is not None:
        spent = ledger.epsilon(last_spend.delta, last_spend.accountant)
    else:
        spent = 0.0
    budget = entries[-1].epsilon_budget if entries else None
    return LedgerTotals(entries=len(entries), spends=sum(e.kind == SPEND for e in entries),
                        refusals=sum(e.kind == REFUSAL for e in entries),
                        non_private=sum(e.kind == NON_PRIVATE for e in entries), epsilon_spent=spent,
                        epsilon_budget=budget, delta=last_spend.delta if last_spend else None,
                        accountant=last_spend.accountant if last_spend else None,
                        epsilon_left=None if budget is None else max(0.0, budget - spent))


# ---------------------------------------------------------------------------- the document
def _finite(x: float | None) -> float | None:
    """A number for JSON: None stands for an unbounded ε."""
    return None if x is None or math.isinf(x) else x


def document(path: str | Path, ledger: PrivacyLedger) -> dict[str, Any]:
    """The ledger as data (``fedsecure ledger show --json``): entries, runs, totals. An unbounded ε is null."""
    added = entry_epsilon_added(ledger)
    totals = totals_of(ledger)
    return {
        "ledger": str(path), "dataset": ledger.dataset, "sealed": ledger.files.sealed, "head": ledger.head,
        "entries": [{**{k: v for k, v in asdict(e).items() if k not in ("hash", "dataset")},
                     "epsilon_added": _finite(a), "hash": e.hash} for e, a in zip(ledger.entries, added, strict=True)],
        "runs": [{**asdict(r), "rounds": list(r.rounds), "refused": list(r.refused),
                  "epsilon_added": _finite(r.epsilon_added)} for r in runs_of(ledger)],
        "totals": {**asdict(totals), "epsilon_spent": _finite(totals.epsilon_spent),
                   "bounded": not math.isinf(totals.epsilon_spent)},
    }


def _eps(x: float | None) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.4f}"


def _time(iso: str) -> str:
    return iso[:19].replace("T", " ")


def _rounds(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds)) or "-"


def entry_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row of :data:`ENTRY_COLUMNS` per entry; a run is shown by its number in :func:`run_rows`."""
    number = {r["run_id"]: i for i, r in enumerate(doc["runs"], 1)}
    rows = []
    for e in doc["entries"]:
        spend = e["kind"] == SPEND
        after = "∞" if e["kind"] == NON_PRIVATE else _eps(e["epsilon_after"])
        rows.append([str(e["seq"]), _time(e["time"]), str(number[e["run_id"]]), str(e["server_round"]), e["kind"],
                     f"{e['sigma']:.4g}" if spend else "-", f"{e['q']:.4g}" if spend else "-",
                     str(e["steps"]) if e["kind"] != REFUSAL else "-", after, f"{e['epsilon_budget']:g}",
                     e["reason"] or ""])
    return rows


def run_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row of :data:`RUN_COLUMNS` per run that touched the dataset."""
    return [[str(i), r["run_id"], _time(r["first"]), _time(r["last"]),
             _rounds(r["rounds"]) + (" (without DP)" if r["non_private"] else ""), _rounds(r["refused"]),
             _eps(r["epsilon_added"]), _eps(r["epsilon_after"])] for i, r in enumerate(doc["runs"], 1)]


def totals_line(doc: dict[str, Any]) -> str:
    """ε spent of the budget, and what is left, in one sentence."""
    t = doc["totals"]
    if t["entries"] == 0:
        return "No entries: this dataset has spent nothing."
    counts = f"{t['spends']} spends, {t['refusals']} refusals, {t['non_private']} non-private releases"
    if not t["bounded"]:
        return (f"ε spent: unbounded (the dataset was released without DP) of budget {t['epsilon_budget']:g}; "
                f"nothing left. {counts}.")
    at = f" at δ = {t['delta']:.1e} ({t['accountant']})" if t["delta"] is not None else ""
    return (f"ε spent: {t['epsilon_spent']:.4f} of budget {t['epsilon_budget']:g}{at}; left: {t['epsilon_left']:.4f}. "
            f"{counts}.")


def tables(doc: dict[str, Any]) -> list[Any]:
    """The ledger for the console: a title line, the entries table, the runs table and the totals."""
    from rich.table import Table
    from rich.text import Text

    form = "sealed" if doc["sealed"] else "plain"
    title = Text(f"Privacy ledger {doc['ledger']} ({form}; dataset {doc['dataset'][:16]}; "
                 f"{len(doc['entries'])} entries; head {doc['head'][:16]})")
    entries = Table(title="Entries", title_justify="left")
    for col in ENTRY_COLUMNS:
        entries.add_column(col, justify="left" if col in ("kind", "reason") else "right", overflow="fold",
                           no_wrap=col == "time (UTC)")
    for row in entry_rows(doc):
        entries.add_row(*(Text(c) for c in row))
    runs = Table(title="Runs that used this dataset's budget", title_justify="left")
    for col in RUN_COLUMNS:
        runs.add_column(col, justify="right" if col.startswith(("ε", "#")) else "left", overflow="fold",
                        no_wrap=col == "run")
    for row in run_rows(doc):
        runs.add_row(*(Text(c) for c in row))
    return [title, entries, runs, Text(totals_line(doc))]
