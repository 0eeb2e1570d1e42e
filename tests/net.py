"""Proof that nothing leaves loopback: run processes with tests/netguard on PYTHONPATH and read what they tried."""

from __future__ import annotations

import json
import os
from pathlib import Path

GUARD = Path(__file__).resolve().parent / "netguard"
LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "", None}


def guarded_env(log: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes (and their children) record their lookups and connects in ``log``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD), env.get("PYTHONPATH", "")) if p)
    env["FEDSECURE_NET_LOG"] = str(log)
    return env


def attempts(log: Path) -> list[dict]:
    """Every lookup and connect recorded in ``log``."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def outbound(log: Path, allowed: set[str] = frozenset()) -> list[dict]:
    """The attempts that would leave the machine: any host but loopback (or ``allowed``), not a Unix socket."""
    out = []
    for a in attempts(log):
        host = a["host"]
        if host in LOOPBACK or host in allowed:
            continue
        if isinstance(host, str) and (host.startswith(("/", "\0", "@")) or host.startswith("127.")):
            continue  # a Unix-domain socket path (abstract or not), or another loopback address
        out.append(a)
    return out
