"""The site's own privacy guard: budget, calibration, fail-closed check, ledger entry.

The budget a site enforces is its own: where the site's node config sets ``privacy.epsilon`` or
``privacy.delta``, the stricter of that and the run config applies, so no coordinator setting
can make a site spend more than it allows. The check runs *before* training; the ledger entry
is durable *before* the update is released.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsecure.config import PrivacySettings
from fedsecure.crypto.keys import KeyRing
from fedsecure.privacy.accounting import Spend, calibrate_noise, default_delta, epsilon_of
from fedsecure.privacy.dpsgd import DPStepPlan
from fedsecure.privacy.ledger import LedgerEntry, PrivacyLedger

log = logging.getLogger(__name__)

NODE_EPSILON = "privacy.epsilon"
NODE_DELTA = "privacy.delta"


@dataclass(frozen=True)
class Refusal:
    """A structured "budget exhausted" answer: the site trains nothing this round."""

    epsilon_spent: float
    epsilon_budget: float
    epsilon_if_trained: float  # inf when no noise level up to SIGMA_MAX would fit
    reason: str


@dataclass(frozen=True)
class Approval:
    plan: DPStepPlan
    epsilon_after: float


class SitePrivacyGuard:
    """Everything a site decides about privacy in one round."""

    def __init__(self, settings: PrivacySettings, *, state_dir: str | Path, dataset: str, num_records: int,
                 node_config: Mapping[str, Any] | None = None, ring: KeyRing | None = None) -> None:
        node_config = node_config or {}
        self.settings = settings
        self.accountant = settings.accountant
        self.num_records = num_records
        eps = settings.epsilon
        if NODE_EPSILON in node_config:
            eps = min(eps, float(node_config[NODE_EPSILON]))
        delta = settings.delta if settings.delta is not None else default_delta(num_records)
        if NODE_DELTA in node_config:
            delta = min(delta, float(node_config[NODE_DELTA]))
        self.epsilon_budget = float(eps)
        self.delta = float(delta)
        self.ledger = PrivacyLedger.open(state_dir, dataset, ring=ring)  # raises LedgerError if tampered

    def spent(self) -> float:
        return self.ledger.epsilon(self.delta, self.accountant)

    def plan(self, *, server_round: int, rounds_total: int, local_steps: int, batch_size: int,
             sigma_hint: float | None = None) -> Approval | Refusal:
        """Decide this round's σ, q and steps, or refuse if they would overspend the budget."""
        q = DPStepPlan.sample_rate(batch_size, self.num_records)
        spent = self.spent()
        sigma = self.settings.noise_multiplier or sigma_hint
        if sigma is None:
            remaining_rounds = max(1, rounds_total - server_round + 1)
            sigma = calibrate_noise(target_epsilon=self.epsilon_budget, delta=self.delta, spent=self.ledger.spends,
                                    q=q, steps=local_steps * remaining_rounds, accountant=self.accountant)
            if sigma is None:
                return Refusal(spent, self.epsilon_budget, math.inf,
                               f"no noise multiplier up to the maximum keeps epsilon within {self.epsilon_budget}")
        eps_after = epsilon_of([*self.ledger.spends, Spend(sigma, q, local_steps)], self.delta, self.accountant)
        if eps_after > self.epsilon_budget:
            return Refusal(spent, self.epsilon_budget, eps_after,
                           f"training round {server_round} would reach epsilon {eps_after:.3f} > budget "
                           f"{self.epsilon_budget}")
        return Approval(DPStepPlan(sigma=float(sigma), q=q, steps=local_steps,
                                   max_grad_norm=self.settings.max_grad_norm), eps_after)

    def record(self, approval: Approval, *, run_id: str, server_round: int) -> LedgerEntry:
        """Charge the round to the ledger, durably. Call after training, before the update leaves."""
        p = approval.plan
        return self.ledger.append(run_id=run_id, server_round=server_round, spend=Spend(p.sigma, p.q, p.steps),
                                  delta=self.delta, accountant=self.accountant, max_grad_norm=p.max_grad_norm,
                                  epsilon_after=approval.epsilon_after, budget_epsilon=self.epsilon_budget)
