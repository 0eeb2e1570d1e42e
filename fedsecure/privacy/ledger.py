"""The privacy ledger: a durable, append-only, hash-chained record of what a dataset has spent.

One ledger per dataset, named by the dataset's fingerprint (not by the run), so every run that
touches a dataset adds to the same total and a restart never resets spent budget. An entry is a
``spend`` (one round's DP-SGD release), a ``refusal`` (the site declined a round: the run asked for
more than its policy allows, the budget was exhausted, a replay; it spends nothing and records the
reason) or a ``non-private`` release (a site whose own policy allows training without DP did so:
from then on the dataset's epsilon is unbounded, recorded as ``epsilon_after: null``). Each line is
one JSON entry; ``prev`` is the ``hash`` of the previous entry and ``hash`` is SHA-256 over the
entry's canonical JSON without ``hash`` (:mod:`fedsecure._durable`). An entry is written and
fsynced (file and directory) *before* the update it accounts for leaves the site.

On open, the whole chain is replayed and checked: a changed, removed or reordered entry, a
broken line or a ledger of another dataset stops the site with :class:`LedgerError`. Each
entry's recorded ε is also recomputed from the history, so an edited σ is caught even if the
editor recomputed the hashes.

The site's :class:`~fedsecure.store.files.StateFiles` decide sealed or plain: sealed (the default),
the ledger is ``privacy-ledger-<key>.jsonl.sealed``, rewritten atomically on each append, so it can be
neither read nor rewritten consistently without the site's key. A ledger that exists in the other
form than the one configured is never ignored: ignoring it would start a fresh budget.

Formats: 2 (this release) adds ``kind`` and ``reason``; format-1 entries (spends, written by earlier
releases) are read and verified as they were hashed, with the budget under its old field name.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedsecure._durable import GENESIS, canonical_json, chain_hash
from fedsecure.crypto.keys import KeyRing
from fedsecure.crypto.sealed import DEFAULT_CHUNK
from fedsecure.crypto.sealed import SUFFIX as SEALED_SUFFIX
from fedsecure.errors import FedSecureError, LedgerError
from fedsecure.privacy.accounting import Spend, epsilon_of
from fedsecure.store.files import StateFiles

LEDGER_FORMAT = 2
SPEND = "spend"
REFUSAL = "refusal"
NON_PRIVATE = "non-private"
KINDS = (SPEND, REFUSAL, NON_PRIVATE)
#: format-1 field names (entries of earlier releases stay verifiable as they were hashed): new -> old
_FORMAT1_FIELDS = {"epsilon_budget": "budget_epsilon"}
_META = "fedsecure-privacy-ledger"


@dataclass(frozen=True)
class LedgerEntry:
    """One line of the ledger."""

    seq: int
    time: str
    dataset: str  # the key of the dataset this entry is charged to
    run_id: str
    server_round: int
    sigma: float
    q: float
    steps: int
    delta: float
    accountant: str
    max_grad_norm: float
    epsilon_after: float | None  # ε of the dataset after this entry; None after a non-private release
    epsilon_budget: float
    prev: str
    hash: str = ""
    format: int = LEDGER_FORMAT
    kind: str = SPEND
    reason: str = ""  # why a round was refused

    @property
    def spend(self) -> Spend:
        """The mechanism this entry released."""
        return Spend(self.sigma, self.q, self.steps)

    def body(self) -> dict[str, Any]:
        """The hashed fields, as they were written (format-1 entries keep their original names)."""
        d = asdict(self)
        d.pop("hash")
        if self.format == 1:
            d.pop("kind")
            d.pop("reason")
            for new, old in _FORMAT1_FIELDS.items():
                d[old] = d.pop(new)
        return d

    def line(self) -> bytes:
        """The entry as one ledger line."""
        return canonical_json({**self.body(), "hash": self.hash}) + b"\n"

    def computed_hash(self) -> str:
        """SHA-256 of the body (what ``hash`` must equal)."""
        return chain_hash(self.body())

    @classmethod
    def parse(cls, data: dict[str, Any]) -> LedgerEntry:
        """An entry from one decoded line (format 1 or 2)."""
        if data.get("format") == 1:
            if "kind" in data or "reason" in data:
                raise TypeError("a format-1 entry with format-2 fields")
            data = dict(data)
            for new, old in _FORMAT1_FIELDS.items():
                data[new] = data.pop(old)
        return cls(**data)


def ledger_path(state_dir: str | Path, dataset: str) -> Path:
    """``privacy-ledger-<key>.jsonl``; the key is the fingerprint's first 16 hex digits or a safe dataset id."""
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset[:64])
    if len(dataset) == 64 and all(c in "0123456789abcdef" for c in dataset):
        key = dataset[:16]
    return Path(state_dir) / f"privacy-ledger-{key}.jsonl"


class PrivacyLedger:
    """The ledger of one dataset; open it with :meth:`open` (which verifies it)."""

    def __init__(self, plain: Path, dataset: str, entries: list[LedgerEntry], files: StateFiles) -> None:
        self.plain = plain
        self.dataset = dataset
        self.entries = entries
        self.files = files

    @property
    def path(self) -> Path:
        """The ledger file, in this site's form (sealed or plain)."""
        return self.files.path(self.plain)

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, state_dir: str | Path, dataset: str, *, ring: KeyRing | None = None, files: StateFiles | None = None,
             verify_epsilon: bool = True, chunk_size: int = DEFAULT_CHUNK) -> PrivacyLedger:
        """Open (and verify) the ledger of ``dataset`` in ``state_dir``, sealed under ``ring`` / ``files``."""
        files = files or StateFiles(ring, chunk_size)
        plain = ledger_path(state_dir, dataset)
        other = files.other_form(plain)
        if other.exists():
            if files.sealed:
                raise LedgerError(f"an unsealed privacy ledger {other} exists while sealing is on. Fix: seal it "
                                  f"(`fedsecure seal {other}`) and move the plain file away; it is never ignored.")
            raise LedgerError(f"privacy ledger {other} is sealed but site.storage.seal is off. Fix: turn "
                              "sealing on with the site's keyring; a sealed ledger is never ignored.")
        try:
            raw = files.read_bytes(plain)
        except FedSecureError as e:
            raise LedgerError(f"privacy ledger {files.path(plain)} cannot be opened: {e} Fix: use the site's own "
                              "keyring; restore the ledger from a backup if it was damaged.") from None
        path = files.path(plain)
        entries: list[LedgerEntry] = []
        if raw is not None:
            prev = GENESIS
            for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
                if not line.strip():
                    continue
                entry = cls._parse(path, lineno, line)
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
        return cls(plain, dataset, entries, files)

    @staticmethod
    def _parse(path: Path, lineno: int, raw: str) -> LedgerEntry:
        try:
            data = json.loads(raw)
            if data.get("format") not in (1, LEDGER_FORMAT):
                raise LedgerError(f"privacy ledger {path}, entry {lineno}: unknown format {data.get('format')!r}; "
                                  f"this fedsecure reads formats 1 and {LEDGER_FORMAT}. Fix: upgrade fedsecure.")
            entry = LedgerEntry.parse(data)
            if entry.kind not in KINDS:
                raise LedgerError(f"privacy ledger {path}, entry {lineno}: unknown kind {entry.kind!r}. Fix: restore "
                                  "the ledger from a backup, or upgrade fedsecure.")
            return entry
        except LedgerError:
            raise
        except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as e:
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
            recorded = entry.epsilon_after
            if recorded is None or abs(eps - recorded) > 1e-6 * max(1.0, abs(eps)):
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} records epsilon {recorded} but its history "
                                  f"gives {eps:.4f}: the ledger was edited. Fix: restore it from a backup.")
        for i, entry in enumerate(entries):
            if entry.kind == REFUSAL and (entry.steps, entry.sigma, entry.q) != (0, 0.0, 0.0):
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} is a refusal that records a spend: the "
                                  "ledger was edited. Fix: restore it from a backup.")
            if entry.kind == NON_PRIVATE and entry.epsilon_after is not None:
                raise LedgerError(f"privacy ledger {path}, entry {i + 1} is a non-private release with a bounded "
                                  "epsilon: the ledger was edited. Fix: restore it from a backup.")

    @property
    def spends(self) -> list[Spend]:
        """Every DP release of this dataset."""
        return [e.spend for e in self.entries if e.kind == SPEND]

    @property
    def refusals(self) -> list[LedgerEntry]:
        """Every refused round."""
        return [e for e in self.entries if e.kind == REFUSAL]

    def trained(self, run_id: str, server_round: int) -> bool:
        """Whether this dataset already released an update for ``server_round`` of ``run_id``."""
        return any(e.kind == SPEND and e.run_id == run_id and e.server_round == server_round for e in self.entries)

    @property
    def head(self) -> str:
        """The hash of the last entry (GENESIS when empty)."""
        return self.entries[-1].hash if self.entries else GENESIS

    def epsilon(self, delta: float, accountant: str) -> float:
        """ε spent so far at ``delta``: the larger of the recomputed value and the last one recorded, under
        ``accountant`` and every accountant the history was charged under (switching accountants never
        lowers what the site counts as spent); infinite once the dataset was released without DP.
        """
        if any(e.kind == NON_PRIVATE for e in self.entries):
            return math.inf
        used = {accountant, *(e.accountant for e in self.entries if e.kind == SPEND)}
        eps = max(epsilon_of(self.spends, delta, a) for a in sorted(used))
        same = [e.epsilon_after for e in self.entries if e.kind == SPEND and (e.delta, e.accountant) == (delta,
                                                                                                       accountant)]
        return max([eps, *(x for x in same[-1:] if x is not None)])

    # ------------------------------------------------------------------ writing
    def append(self, *, run_id: str, server_round: int, spend: Spend, delta: float, accountant: str,
               max_grad_norm: float, epsilon_after: float, epsilon_budget: float) -> LedgerEntry:
        """Append one spend and make it durable (fsync of the file and its directory) before returning."""
        return self._write(dict(run_id=run_id, server_round=server_round, sigma=spend.sigma, q=spend.q,
                                steps=spend.steps, delta=delta, accountant=accountant, max_grad_norm=max_grad_norm,
                                epsilon_after=epsilon_after, epsilon_budget=epsilon_budget))

    def append_refusal(self, *, run_id: str, server_round: int, reason: str, delta: float, accountant: str,
                       epsilon_spent: float, epsilon_budget: float) -> LedgerEntry:
        """Record (durably) that the site refused a round, and why. It spends nothing."""
        spent = epsilon_spent if math.isfinite(epsilon_spent) else None
        return self._write(dict(run_id=run_id, server_round=server_round, sigma=0.0, q=0.0, steps=0, delta=delta,
                                accountant=accountant, max_grad_norm=0.0, epsilon_after=spent,
                                epsilon_budget=epsilon_budget, kind=REFUSAL, reason=reason[:2000]))

    def append_non_private(self, *, run_id: str, server_round: int, steps: int, epsilon_budget: float) -> LedgerEntry:
        """Record (durably, before release) that the dataset trained without DP: its epsilon is now unbounded."""
        return self._write(dict(run_id=run_id, server_round=server_round, sigma=0.0, q=0.0, steps=steps, delta=0.0,
                                accountant="none", max_grad_norm=0.0, epsilon_after=None,
                                epsilon_budget=epsilon_budget, kind=NON_PRIVATE,
                                reason="trained without differential privacy (the site's own policy allows it)"))

    def _write(self, fields: dict[str, Any]) -> LedgerEntry:
        entry = LedgerEntry(seq=len(self.entries), time=_dt.datetime.now(_dt.UTC).isoformat(), dataset=self.dataset,
                            prev=self.head, **fields)
        entry = LedgerEntry(**{**asdict(entry), "hash": entry.computed_hash()})
        line = entry.line()
        whole = b"".join(e.line() for e in self.entries) + line
        self.files.append_line(self.plain, line, whole, {"content": _META, "dataset": self.dataset})
        self.entries.append(entry)
        return entry


# ---------------------------------------------------------------------------- reading a ledger file (an auditor)
LEDGER_PREFIX = "privacy-ledger-"


def is_ledger_file(path: str | Path) -> bool:
    """Whether ``path`` is named like a ledger (``privacy-ledger-<key>.jsonl``, plain or ``.sealed``)."""
    name = Path(path).name
    return name.startswith(LEDGER_PREFIX) and name.endswith((".jsonl", ".jsonl" + SEALED_SUFFIX))


def ledger_files(folder: str | Path) -> list[Path]:
    """The ledger files directly in ``folder`` (a site's state directory), sealed or plain, sorted by name."""
    d = Path(folder)
    return sorted(p for p in d.glob(LEDGER_PREFIX + "*") if p.is_file() and is_ledger_file(p)) if d.is_dir() else []


def open_ledger_file(path: str | Path, ring: KeyRing | None = None) -> PrivacyLedger:
    """Open and verify the ledger in the file ``path`` without knowing its dataset beforehand.

    The dataset is read from the first entry and the file must be named as that dataset's ledger
    (:func:`ledger_path`); :meth:`PrivacyLedger.open` then checks the whole hash chain and recomputes
    every recorded ε. A sealed file (``.sealed``) needs the site's ``ring``; a plain one needs none.

    Raises:
        LedgerError: the file is missing, cannot be decrypted, or fails any check (naming the entry).
    """
    p = Path(path)
    sealed = p.name.endswith(SEALED_SUFFIX)
    plain = p.with_name(p.name.removesuffix(SEALED_SUFFIX))
    if not is_ledger_file(p):
        raise LedgerError(f"{p} is not a privacy ledger (privacy-ledger-<key>.jsonl or .jsonl.sealed)")
    if not p.is_file():
        raise LedgerError(f"privacy ledger {p} does not exist")
    if sealed and ring is None:
        raise LedgerError(f"privacy ledger {p} is sealed; opening it needs the site's keyring")
    files = StateFiles(ring if sealed else None)
    try:
        raw = files.read_bytes(plain) or b""
    except FedSecureError as e:
        raise LedgerError(f"privacy ledger {p} cannot be opened: {e} Fix: use the site's own keyring; restore the "
                          "ledger from a backup if it was damaged.") from None
    dataset = _first_dataset(raw) or plain.name.removeprefix(LEDGER_PREFIX).removesuffix(".jsonl")
    if ledger_path(p.parent, dataset) != plain:
        raise LedgerError(f"privacy ledger {p} holds entries of dataset {dataset[:16]}, whose ledger is named "
                          f"{ledger_path(p.parent, dataset).name}: the file was renamed or replaced. Fix: restore it "
                          "from a backup.")
    return PrivacyLedger.open(p.parent, dataset, files=files)


def _first_dataset(raw: bytes) -> str | None:
    """The ``dataset`` of the first entry, or None (the verifier then names what is wrong with that line)."""
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                return None
            value = data.get("dataset") if isinstance(data, dict) else None
            return value if isinstance(value, str) and value else None
    return None

