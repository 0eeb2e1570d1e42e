"""The single exception tree of fedsecure.

Every error a user can cause (bad config, missing file, tampered state, exhausted budget)
is a :class:`FedSecureError` whose message names the problem *and* the fix. The CLI turns
these into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class FedSecureError(Exception):
    """Base class for all fedsecure errors."""


class ConfigError(FedSecureError, ValueError):
    """A configuration key has an unknown name, a wrong type or an invalid value."""


class DataError(FedSecureError, ValueError):
    """A site dataset is missing, empty or malformed."""


class ModelError(FedSecureError, ValueError):
    """A model directory or preset cannot be used."""


class AdapterError(FedSecureError, ValueError):
    """An adapter state does not match the model it is applied to."""


class LedgerError(FedSecureError):
    """The privacy ledger is unreadable, edited or its hash chain is broken: the site must stop."""


class BudgetExhaustedError(FedSecureError):
    """Training would take the site past its (ε, δ) budget."""


class IntegrityError(FedSecureError):
    """A sealed file failed authentication (tampered, truncated, reordered or the wrong key).

    It says which file, never which byte: nothing from a failed file is ever returned.
    """


class KeyMaterialError(FedSecureError):
    """A key-encryption key is missing, malformed or stored unsafely."""


class UpdateRejected(FedSecureError):
    """An encoded update is malformed, oversized, does not match the adapter, or is not finite."""


class AttestationError(FedSecureError):
    """Evidence failed verification; the message says which check failed."""


class ReplyRejected(FedSecureError):
    """A site's reply to the coordinator is malformed, out of range or inconsistent; the site's contribution to
    the round is rejected (and audited), and the round goes on.
    """


class ReportError(FedSecureError):
    """A report cannot be made from what was given (no run there, unreadable summary, no ledgers)."""


class SecAggError(FedSecureError):
    """A secure-aggregation message or round was refused: names the site, the phase and the reason."""
