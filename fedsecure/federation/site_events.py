"""What a site did with each message, as lines its operator reads (``fedsecure client`` prints them).

The ClientApp runs inside Flower's processes (or the site's warm worker), whose output the operator
does not see. Each handled message appends one JSON line to ``<state_dir>/site-events.jsonl``; the
site's supervisor (:func:`fedsecure.launch.deploy.run_site`) follows that file and prints
:func:`describe` of each line: a round trained with the ε spent of the budget, a refusal and its
reason, an exhausted budget, a budget remnant being spent on noise, the last round of a run.

The file holds no records and no weights: only what the site also tells the coordinator (and the
remnant warning). Writing it never fails a round.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVENTS = "site-events.jsonl"
TRAINED, REFUSED, EXHAUSTED, NON_PRIVATE, EVALUATED, FAILED, REMNANT = (
    "trained", "refused", "exhausted", "non-private", "evaluated", "failed", "remnant")


def record(state_dir: str | Path, event: str, **fields: Any) -> None:
    """Append one event (best effort: a full disk must not fail the round, whose ledger entry is already durable)."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # a site's first message may be an evaluation
        # a plain append, no fsync: progress lines, not a record (the ledger is the durable one)
        fd = os.open(Path(state_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps({"time": now, "event": event, **fields}) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot write the site's event line (%s): %s", event, e)


#: events that are a label and the site's reason
_WITH_REASON = {REFUSED: "refused", REMNANT: "WARNING", FAILED: "failed"}


def _eps(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4g}"


def describe(site: str, ev: dict[str, Any]) -> str | None:
    """One progress line for the site's operator; None for an unknown event."""
    where = f"site {site}: run {ev.get('run')} round {ev.get('round')}/{ev.get('rounds')}"
    kind = ev.get("event")
    if kind == TRAINED:
        return (f"{where}: trained on {ev.get('records')} records ({ev.get('steps')} DP-SGD steps, sigma "
                f"{float(ev.get('sigma', 0)):.3g}), train loss {float(ev.get('loss', 0)):.4f}; epsilon spent "
                f"{_eps(ev.get('epsilon'))} of {_eps(ev.get('budget'))}; update sent")
    if kind == NON_PRIVATE:
        return f"{where}: trained WITHOUT differential privacy (this site's policy allows it); update sent"
    if kind in _WITH_REASON:
        return f"{where}: {_WITH_REASON[kind]}: {ev.get('reason')}"
    if kind == EXHAUSTED:
        return (f"{where}: privacy budget exhausted (epsilon spent {_eps(ev.get('epsilon'))} of "
                f"{_eps(ev.get('budget'))}); nothing trained, the coordinator was told")
    if kind == EVALUATED:
        line = f"{where}: held-out loss {float(ev.get('loss', 0)):.4f} on {ev.get('records')} records"
        if ev.get("round") is not None and ev.get("round") == ev.get("rounds"):
            line += "; that was the run's last round: the run is finished on this site's side"
        return line
    return None
