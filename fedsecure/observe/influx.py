"""The coordinator's figures as InfluxDB line protocol, pushed after every round (for sites running
InfluxDB/Telegraf rather than Prometheus).

Optional (``metrics.influx_url``): InfluxDB 1.x ``/write?db=`` (``metrics.influx_db``) or 2.x ``/api/v2/write``
(``metrics.influx_org`` and ``metrics.influx_bucket``; the token is read from the environment variable named by
``metrics.influx_token_env``, never from a config file). Escaping follows the line-protocol reference; a test has a
real InfluxDB read back site names full of spaces, commas, equals signs, quotes and backslashes. A failed push is
logged and counted, never raised: figures are a convenience, the run's records are in the run directory.

Pushes run on a writer thread (:meth:`InfluxPusher.submit`): a slow or unreachable InfluxDB never delays a round.
At most ``queue_rounds`` rounds wait; beyond that the oldest is dropped and counted. :meth:`InfluxPusher.close`
at the end of the run gives the writer a bounded time to send what is left.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from fedsecure.config import MetricsSettings

log = logging.getLogger(__name__)


def _escape(s: str, chars: str) -> str:
    # a backslash is literal in names and tags (InfluxDB 1.x keeps "\\\\" as two); only the separators are escaped
    for c in chars:
        s = s.replace(c, "\\" + c)
    return s


def _field(v: Any) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else None
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, Any], ts_ns: int) -> str:
    """One line: ``measurement,tag=v field=v ts`` with the reference's escaping. Non-finite floats are dropped.

    Raises:
        ValueError: No field is left (a line needs at least one).
    """
    head = _escape(measurement, ", ")
    for k, v in tags.items():
        if v != "":
            head += f",{_escape(k, ',= ')}={_escape(str(v), ',= ')}"
    body = [f"{_escape(k, ',= ')}={f}" for k, v in fields.items() if (f := _field(v)) is not None]
    if not body:
        raise ValueError(f"line protocol: {measurement!r} needs at least one field with a finite value")
    return f"{head} {','.join(body)} {int(ts_ns)}"


def round_lines(run: str, summary: Mapping[str, Any], privacy: Mapping[str, Mapping[str, Any]], ts_ns: int
                ) -> list[str]:
    """The round's federation figures and each site's privacy figures (as in metrics.jsonl and privacy.json)."""
    fields: dict[str, Any] = {"round": int(summary["round"]), "seconds": float(summary["seconds"]),
                              "bytes_down": int(summary.get("bytes_down", 0)),
                              "bytes_up": int(summary.get("bytes_up", 0))}
    if summary.get("eval_loss") is not None:
        fields["eval_loss"] = float(summary["eval_loss"])
    fields["sites_ok"] = int(summary.get("sites_ok", 0))
    out = [line("fedsecure_round", {"run": run}, fields, ts_ns)]
    for site, p in privacy.items():
        spent, budget = p.get("epsilon_spent"), p.get("epsilon_budget")
        f: dict[str, Any] = {}
        if spent is not None:
            f["epsilon_spent"] = float(spent)
        if budget is not None:
            f["epsilon_budget"] = float(budget)
            if spent is not None:
                f["epsilon_remaining"] = max(0.0, float(budget) - float(spent))
        if f:
            out.append(line("fedsecure_site", {"run": run, "site": site}, f, ts_ns))
    return out


class InfluxPusher:
    """Posts lines to the configured InfluxDB; counts failures."""

    def __init__(self, settings: MetricsSettings, timeout_s: float = 5.0, queue_rounds: int = 64) -> None:
        base = settings.influx_url.rstrip("/")
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if settings.influx_version == 2:
            query = urllib.parse.urlencode({"org": settings.influx_org, "bucket": settings.influx_bucket,
                                            "precision": "ns"})
            self.url = f"{base}/api/v2/write?{query}"
            token = os.environ.get(settings.influx_token_env, "") if settings.influx_token_env else ""
            if token:
                self.headers["Authorization"] = f"Token {token}"
        else:
            self.url = f"{base}/write?{urllib.parse.urlencode({'db': settings.influx_db, 'precision': 'ns'})}"
        self.timeout_s = timeout_s
        self.failures = self.dropped = self.sent = 0
        self._queue: queue.Queue[list[str] | None] = queue.Queue(maxsize=queue_rounds)
        self._writer: threading.Thread | None = None

    def submit(self, lines: Sequence[str]) -> None:
        """Queue one round's lines for the writer thread; returns at once (the oldest round is dropped, and
        counted, when ``queue_rounds`` are already waiting).
        """
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="influx-writer", daemon=True)
            self._writer.start()
        while True:
            try:
                self._queue.put_nowait(list(lines))
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                    log.warning("metrics: InfluxDB is behind by %d rounds; the oldest was dropped",
                                self._queue.maxsize)
                except queue.Empty:
                    pass

    def _write(self) -> None:
        while (lines := self._queue.get()) is not None:
            if self.push(lines):
                self.sent += 1

    def close(self, timeout_s: float = 10.0) -> bool:
        """Let the writer send what is queued, for at most ``timeout_s``; True when everything was handed over."""
        if self._writer is None:
            return True
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._writer.join(timeout_s)
        done = not self._writer.is_alive()
        if not done:
            log.warning("metrics: InfluxDB did not take the last figures within %.0f s; they are dropped (the run's "
                        "records are in its run directory)", timeout_s)
        self._writer = None
        return done

    def push(self, lines: Sequence[str]) -> bool:
        """Write ``lines``; False (logged, counted) when the server refuses or cannot be reached."""
        data = ("\n".join(lines) + "\n").encode()
        req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                if 200 <= resp.status < 300:
                    return True
                why = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}: {e.read(300).decode(errors='replace')}"
        except (urllib.error.URLError, OSError) as e:
            why = str(getattr(e, "reason", e))
        self.failures += 1
        log.warning("metrics: InfluxDB write to %s failed (%s); the run goes on", self.url.split("?")[0], why)
        return False
