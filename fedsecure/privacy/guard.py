"""The site's own privacy guard: budget, calibration, fail-closed check, ledger entry.

The terms come from :func:`fedsecure.privacy.policy.resolve`: the site's own policy, tightened (never
loosened) by the run's request. The check runs *before* training; the ledger entry is durable
*before* the update is released; a refusal is recorded in the ledger too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedsecure.crypto.keys import KeyRing
from fedsecure.privacy.accounting import Spend, calibrate_noise, epsilon_of
from fedsecure.privacy.ledger import LedgerEntry, PrivacyLedger
from fedsecure.privacy.policy import Terms
from fedsecure.store.files import StateFiles

log = logging.getLogger(__name__)

#: a run whose σ is this many times what a fresh budget would need is "spending a remnant" (a warning)
REMNANT_NOISE_RATIO = 2.0


@dataclass(frozen=True)
class DPStepPlan:
    """What one round of DP-SGD at a site will do (and what gets accounted)."""

    sigma: float  # noise multiplier
    q: float  # Poisson sampling rate
    steps: int
    max_grad_norm: float

    @staticmethod
    def sample_rate(batch_size: int, num_records: int) -> float:
        """Poisson sampling rate q = batch / records (at most 1)."""
        return min(1.0, batch_size / num_records)


@dataclass(frozen=True)
class Refusal:
    """A structured "budget exhausted" answer: the site trains nothing this round."""

    epsilon_spent: float
    epsilon_budget: float
    epsilon_if_trained: float  # inf when no noise level up to SIGMA_MAX would fit
    reason: str


@dataclass(frozen=True)
class Approval:
    """The site trains this round under ``plan``; the ledger will then record ``epsilon_after``."""

    plan: DPStepPlan
    epsilon_after: float
    accountant: str  # the accountant whose bound is binding (the largest over every one this dataset used)


class SitePrivacyGuard:
    """Everything a site decides about privacy in one round, under ``terms``."""

    def __init__(self, terms: Terms, *, state_dir: str | Path, dataset: str, num_records: int,
                 ring: KeyRing | None = None, files: StateFiles | None = None) -> None:
        self.terms = terms
        self.accountant = terms.accountant
        self.num_records = num_records
        self.epsilon_budget = float(terms.epsilon_budget)
        self.delta = float(terms.delta)
        # raises LedgerError if tampered
        self.ledger = PrivacyLedger.open(state_dir, dataset, ring=ring, files=files)

    def _accountants(self) -> list[str]:
        """The requested accountant and every one the dataset was charged under: the largest bound counts."""
        return sorted({self.accountant, *(e.accountant for e in self.ledger.entries if e.kind == "spend")})

    def spent(self) -> float:
        """ε this dataset has spent (the largest bound over the accountants it used)."""
        return self.ledger.epsilon(self.delta, self.accountant)

    def plan(self, *, server_round: int, rounds_total: int, sigma_hint: float | None = None) -> Approval | Refusal:
        """Decide this round's σ, q and steps, or refuse if they would overspend the budget."""
        t = self.terms
        q = DPStepPlan.sample_rate(t.batch_size, self.num_records)
        spent = self.spent()
        if not math.isfinite(spent):
            return Refusal(spent, self.epsilon_budget, math.inf, "this dataset was released without differential "
                           "privacy (see its ledger): its epsilon is unbounded, and no budget can be kept")
        sigma = t.sigma if t.sigma is not None else sigma_hint
        if sigma is not None and sigma < t.min_sigma:
            sigma = None  # a stored hint from a looser earlier policy: calibrate again
        if sigma is None:
            remaining_rounds = max(1, rounds_total - server_round + 1)
            sigma = calibrate_noise(epsilon_budget=self.epsilon_budget, delta=self.delta, spent=self.ledger.spends,
                                    q=q, steps=t.steps * remaining_rounds, accountant=self.accountant,
                                    sigma_min=t.min_sigma)
            if sigma is None:
                return Refusal(spent, self.epsilon_budget, math.inf,
                               f"no noise multiplier up to the maximum keeps epsilon within {self.epsilon_budget}")
        history = [*self.ledger.spends, Spend(sigma, q, t.steps)]
        eps_after, accountant = max((epsilon_of(history, self.delta, a), a) for a in self._accountants())
        if eps_after > self.epsilon_budget:
            return Refusal(spent, self.epsilon_budget, eps_after,
                           f"training round {server_round} would reach epsilon {eps_after:.3f} > budget "
                           f"{self.epsilon_budget}")
        return Approval(DPStepPlan(sigma=float(sigma), q=q, steps=t.steps, max_grad_norm=t.clip), eps_after,
                        accountant)

    def remnant(self, approval: Approval, *, server_round: int, rounds_total: int) -> str | None:
        """A warning when ``approval`` spends a budget remnant: earlier runs left so little ε that the σ this run
        needs is at least :data:`REMNANT_NOISE_RATIO` times what a fresh budget would need for the same plan (the
        updates would be mostly noise). None otherwise, or when the run fixed σ itself.
        """
        if self.terms.sigma is not None or not self.ledger.spends:
            return None
        p = approval.plan
        steps = p.steps * max(1, rounds_total - server_round + 1)
        fresh = calibrate_noise(epsilon_budget=self.epsilon_budget, delta=self.delta, spent=[], q=p.q, steps=steps,
                                accountant=self.accountant, sigma_min=self.terms.min_sigma)
        if fresh is None or p.sigma < REMNANT_NOISE_RATIO * fresh:
            return None
        spent = self.spent()
        left = self.epsilon_budget - spent
        return (f"spending a budget remnant: only epsilon {left:.4g} of {self.epsilon_budget:g} is "
                f"left for this dataset (earlier runs spent {spent:.4g}), so this run trains with sigma {p.sigma:.3g} "
                f"where a fresh budget would need {fresh:.3g}: its updates carry {p.sigma / fresh:.0f}x the noise and "
                "will barely move the model. A dataset's budget is never reset; whether to spend the rest this way is "
                "the site's decision (site.privacy.epsilon_budget)")

    def record(self, approval: Approval, *, run_id: str, server_round: int) -> LedgerEntry:
        """Charge the round to the ledger, durably. Call after training, before the update leaves."""
        p = approval.plan
        return self.ledger.append(run_id=run_id, server_round=server_round, spend=Spend(p.sigma, p.q, p.steps),
                                  delta=self.delta, accountant=approval.accountant, max_grad_norm=p.max_grad_norm,
                                  epsilon_after=approval.epsilon_after, epsilon_budget=self.epsilon_budget)

    def refuse(self, reason: str, *, run_id: str, server_round: int) -> LedgerEntry:
        """Record a refused round (nothing spent) durably, with its reason."""
        return self.ledger.append_refusal(run_id=run_id, server_round=server_round, reason=reason, delta=self.delta,
                                          accountant=self.accountant, epsilon_spent=self.spent(),
                                          epsilon_budget=self.epsilon_budget)
