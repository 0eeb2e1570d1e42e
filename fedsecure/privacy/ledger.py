"""The privacy ledger: a durable, append-only, hash-chained record of what a dataset has spent.

One ledger per dataset, named by the dataset's fingerprint (not by the run), so every run that
touches a dataset adds to the same total and a restart never resets spent budget. An entry is a
``spend`` (one round's DP-SGD release) or, since format 2, a ``refusal`` (the site declined a
round: the run asked for more than its policy allows, the budget was exhausted, a replay; it
spends nothing and records the reason) or a ``non-private`` release (a site whose own policy
allows training without DP did so: from then on the dataset's epsilon is infinite, and the
ledger says so). Each line is one JSON entry; ``prev`` is the ``hash`` of the previous entry and
``hash`` is SHA-256 over the entry's canonical JSON without ``hash``. An entry is written and
fsynced (file and directory) *before* the update it accounts for leaves the site.

On open, the whole chain is replayed and checked: a changed, removed or reordered entry, a
broken line or a ledger of another dataset stops the site with :class:`LedgerError`. Each
entry's recorded ε is also recomputed from the history, so an edited σ is caught even if the
editor recomputed the hashes.

With a keyring (sealing on, the default), the ledger file is a sealed file
(``privacy-ledger-<key>.jsonl.sealed``) rewritten atomically on each append, so it can be neither
read nor rewritten consistently without the site's key. A ledger that exists in the other form
than the one configured (sealed while sealing is off, or the other way round) is never ignored:
ignoring it would start a fresh budget.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK, SUFFIX, open_bytes, seal_bytes
from fedsecure.errors import FedSecureError, LedgerError
from fedsecure.fsutil import fsync_dir
from fedsecure.privacy.accounting import Spend, epsilon_of

LEDGER_FORMAT = 2  # 2 added ``kind`` and ``reason``; format-1 entries (spends) are still read and verified
GENESIS = "0" * 64
SPEND = "spend"
REFUSAL = "refusal"
NON_PRIVATE = "non-private"
KINDS = (SPEND, REFUSAL, NON_PRIVATE)


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    time: str
    dataset: str  # fingerprint of the dataset this spend is charged to
    run_id: str
    server_round: int
    sigma: float
    q: float
    steps: int
    delta: float
    accountant: str
    max_grad_norm: float
    epsilon_after: float
    budget_epsilon: float
    prev: str
    hash: str = ""
    format: int = LEDGER_FORMAT
    kind: str = SPEND  # spend | refusal
    reason: str = ""  # why a round was refused

    @property
    def spend(self) -> Spend:
        return Spend(self.sigma, self.q, self.steps)

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hash")
        if self.format == 1:  # format-1 entries were hashed without these fields
            d.pop("kind")
            d.pop("reason")
        return d

    def line(self) -> str:
        """The entry as one ledger line (format-1 entries keep their original fields)."""
        return json.dumps({**self.body(), "hash": self.hash}, sort_keys=True) + "\n"

    def computed_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ledger_path(state_dir: str | Path, dataset: str) -> Path:
    """``privacy-ledger-<key>.jsonl``; the key is the fingerprint's first 16 hex digits or a safe dataset id."""
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset[:64])
    if len(dataset) == 64 and all(c in "0123456789abcdef" for c in dataset):
        key = dataset[:16]
    return Path(state_dir) / f"privacy-ledger-{key}.jsonl"


class PrivacyLedger:
    """The ledger of one dataset; open it with :meth:`open` (which verifies it)."""

    def __init__(self, path: Path, dataset: str, entries: list[LedgerEntry], ring: KeyRing | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self.path = path
        self.dataset = dataset
        self.entries = entries
        self.ring = ring
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, state_dir: str | Path, dataset: str, *, ring: KeyRing | None = None, verify_epsilon: bool = True,
             chunk_size: int = DEFAULT_CHUNK) -> PrivacyLedger:
        plain = ledger_path(state_dir, dataset)
        sealed = plain.with_name(plain.name + SUFFIX)
        text: str | None = None
        if ring is not None:
            path = sealed
            if plain.exists():
                raise LedgerError(f"an unsealed privacy ledger {plain} exists while sealing is on. Fix: seal it "
                                  f"(`fedsecure seal {plain}`) and move the plain file away; it is never ignored.")
            if sealed.exists():
                try:
                    text = open_bytes(sealed, ring)[0].decode("utf-8")
                except FedSecureError as e:
                    raise LedgerError(f"privacy ledger {sealed} cannot be opened: {e} Fix: use the site's own "
                                      "keyring; restore the ledger from a backup if it was damaged.") from None
        else:
            path = plain
            if sealed.exists():
                raise LedgerError(f"privacy ledger {sealed} is sealed but site.storage.seal is off. Fix: turn "
                                  "sealing on with the site's keyring; a sealed ledger is never ignored.")
            if plain.exists():
                text = plain.read_text(encoding="utf-8")
        entries: list[LedgerEntry] = []
        if text is not None:
            prev = GENESIS
            for lineno, raw in enumerate(text.splitlines(), start=1):
                if not raw.strip():
                    continue
                entry = cls._parse(path, lineno, raw)
                where = f"privacy ledger {path}, entry {lineno}"
                fix = ("Fix: restore the ledger from a backup. Never delete or hand-edit it: the ledger is the "
                       "only record of the privacy budget this dataset has spent.")
                if entry.hash != entry.computed_hash():
                    raise LedgerError(f"{where} was edited (its hash does not match its content). {fix}")
                if entry.prev != prev or entry.seq != len(entries):
                    raise LedgerError(f"{where} breaks the hash chain (an entry was removed, reordered or "
                                      f"inserted). {fix}")
                if entry.dataset != dataset:
                    raise LedgerError(f"{where} belongs to dataset {entry.dataset[:16]}, not {dataset[:16]}. {fix}")
                entries.append(entry)
                prev = entry.hash
            if verify_epsilon:
                cls._verify_epsilons(path, entries)
        return cls(path, dataset, entries, ring, chunk_size)

    @staticmethod
    def _parse(path: Path, lineno: int, raw: str) -> LedgerEntry:
        try:
            data = json.loads(raw)
            if data.get("format") not in (1, LEDGER_FORMAT):
                raise LedgerError(f"privacy ledger {path}, entry {lineno}: unknown format {data.get('format')!r}; "
                                  f"this fedsecure reads formats 1 and {LEDGER_FORMAT}. Fix: upgrade fedsecure.")
            if data["format"] == 1 and ("kind" in data or "reason" in data):
                raise LedgerError(f"privacy ledger {path}, entry {lineno}: a format-1 entry with format-2 fields; "
                                  "the file was edited. Fix: restore the ledger from a backup.")
            entry = LedgerEntry(**data)
            if entry.kind not in KINDS:
                raise LedgerError(f"privacy ledger {path}, entry {lineno}: unknown kind {entry.kind!r}. Fix: restore "
                                  "the ledger from a backup, or upgrade fedsecure.")
            return entry
        except LedgerError:
            raise
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise LedgerError(f"privacy ledger {path}, entry {lineno} is not a valid entry ({e}); the file was "
                              "truncated or edited. Fix: restore the ledger from a backup; never delete it.") from None

    @staticmethod
    def _verify_epsilons(path: Path, entries: list[LedgerEntry]) -> None:
        spent = [(i, e) for i, e in enumerate(entries) if e.kind == SPEND]
        for j, (i, entry) in enumerate(spent):
            if j != len(spent) - 1 and (spent[j + 1][1].delta, spent[j + 1][1].accountant) == \
                    (entry.delta, entry.accountant):
                continue  # only the last entry of each (delta, accountant) stretch needs recomputing
            eps = epsilon_of([e.spend for _, e in spent[: j + 1]], entry.delta, entry.accountant)
            if abs(eps - entry.epsilon_after) > 1e-6 * max(1.0, abs(eps)):
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} records epsilon {entry.epsilon_after:.4f} "
                                  f"but its history gives {eps:.4f}: the ledger was edited. Fix: restore it from "
                                  "a backup.")
        for i, entry in enumerate(entries):
            if entry.kind == REFUSAL and (entry.steps, entry.sigma, entry.q) != (0, 0.0, 0.0):
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} is a refusal that records a spend: the "
                                  "ledger was edited. Fix: restore it from a backup.")
            if entry.kind == NON_PRIVATE and entry.epsilon_after != math.inf:
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} is a non-private release with a finite "
                                  "epsilon: the ledger was edited. Fix: restore it from a backup.")

    @property
    def spends(self) -> list[Spend]:
        return [e.spend for e in self.entries if e.kind == SPEND]

    @property
    def refusals(self) -> list[LedgerEntry]:
        return [e for e in self.entries if e.kind == REFUSAL]

    def trained(self, run_id: str, server_round: int) -> bool:
        """Whether this dataset already released an update for ``server_round`` of ``run_id``."""
        return any(e.kind == SPEND and e.run_id == run_id and e.server_round == server_round for e in self.entries)

    @property
    def head(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS

    def epsilon(self, delta: float, accountant: str) -> float:
        """ε spent so far at ``delta``: the larger of the recomputed value and the last one recorded, under
        ``accountant`` and every accountant the history was charged under (switching accountants never
        lowers what the site counts as spent)."""
        if any(e.kind == NON_PRIVATE for e in self.entries):
            return math.inf
        used = {accountant, *(e.accountant for e in self.entries if e.kind == SPEND)}
        eps = max(epsilon_of(self.spends, delta, a) for a in sorted(used))
        same = [e.epsilon_after for e in self.entries if e.kind == SPEND and (e.delta, e.accountant) == (delta,
                                                                                                       accountant)]
        return max([eps, *same[-1:]])

    # ------------------------------------------------------------------ writing
    def append(self, *, run_id: str, server_round: int, spend: Spend, delta: float, accountant: str,
               max_grad_norm: float, epsilon_after: float, budget_epsilon: float) -> LedgerEntry:
        """Append one spend and make it durable (fsync of the file and its directory) before returning."""
        return self._write(LedgerEntry(
            seq=len(self.entries), time=_dt.datetime.now(_dt.UTC).isoformat(), dataset=self.dataset, run_id=run_id,
            server_round=server_round, sigma=spend.sigma, q=spend.q, steps=spend.steps, delta=delta,
            accountant=accountant, max_grad_norm=max_grad_norm, epsilon_after=epsilon_after,
            budget_epsilon=budget_epsilon, prev=self.head))

    def append_refusal(self, *, run_id: str, server_round: int, reason: str, delta: float, accountant: str,
                       epsilon_spent: float, budget_epsilon: float) -> LedgerEntry:
        """Record (durably) that the site refused a round, and why. It spends nothing."""
        return self._write(LedgerEntry(
            seq=len(self.entries), time=_dt.datetime.now(_dt.UTC).isoformat(), dataset=self.dataset, run_id=run_id,
            server_round=server_round, sigma=0.0, q=0.0, steps=0, delta=delta, accountant=accountant,
            max_grad_norm=0.0, epsilon_after=epsilon_spent, budget_epsilon=budget_epsilon, prev=self.head,
            kind=REFUSAL, reason=reason[:2000]))

    def append_non_private(self, *, run_id: str, server_round: int, steps: int) -> LedgerEntry:
        """Record (durably, before release) that the dataset trained without DP: its epsilon is now infinite."""
        return self._write(LedgerEntry(
            seq=len(self.entries), time=_dt.datetime.now(_dt.UTC).isoformat(), dataset=self.dataset, run_id=run_id,
            server_round=server_round, sigma=0.0, q=0.0, steps=steps, delta=0.0, accountant="none",
            max_grad_norm=0.0, epsilon_after=math.inf, budget_epsilon=math.inf, prev=self.head, kind=NON_PRIVATE,
            reason="trained without differential privacy (the site's own policy allows it)"))

    def _write(self, entry: LedgerEntry) -> LedgerEntry:
        entry = LedgerEntry(**{**asdict(entry), "hash": entry.computed_hash()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = entry.line()
        if self.ring is not None:
            # sealed: rewrite the whole (small) ledger atomically; the writer fsyncs file and directory
            body = "".join(e.line() for e in self.entries) + line
            seal_bytes(self.path, body.encode("utf-8"), self.ring,
                       {"content": "fedsecure-privacy-ledger", "dataset": self.dataset}, self.chunk_size)
            self.entries.append(entry)
            return entry
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)
        self.entries.append(entry)
        return entry
