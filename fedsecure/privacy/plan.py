"""Suggest an expected batch and local steps for a budget: which plan leaves the most signal after the noise.

For DP-SGD at a fixed budget, the noise multiplier σ that a plan needs grows with the sampling rate
``q = B / N`` and the number of steps ``T``. What training sees per step is the mean clipped gradient
plus noise of standard deviation ``σ C / B``; over ``T`` steps the signal adds up as ``T`` and the
noise as ``sqrt(T)``, so a plan's *signal-to-noise score* is ``sqrt(T) B / σ`` (in units of the
per-record gradient over ``C``). Where σ is large it grows about in proportion to ``q sqrt(T)`` and
every plan scores alike: then fewer examples per round (``B x steps``) cost less compute for the
same privacy and noise. Where σ is small (tiny batches, few steps), it cannot shrink further and a
larger batch wins. This is the advice of Ponomareva et al., "How to DP-fy ML" (2023) on batch size,
made a number: the suggestion is the plan with the fewest examples per round among those within
``tolerance`` of the best score.

Measured on the demo (BENCHMARKS.md, bench_private_defaults, lr 0.0035, 384 records, 3 rounds,
ε = 3): the score orders batch/steps 128/24, 128/16, 64/24, 64/16 exactly as their DP losses do.
The score knows nothing of the learning rate or of the data: it ranks plans, the benchmark decides.
Ranking uses RDP (fast and an upper bound on ε, so never optimistic); the caller calibrates the
chosen plan with the site's own accountant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsecure.errors import ConfigError
from fedsecure.privacy.accounting import calibrate_noise

BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
STEPS = (4, 8, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Plan:
    """One candidate: expected batch, DP-SGD steps per round, the σ that fits the budget, and its score."""

    batch: int
    local_steps: int
    sigma: float
    score: float  # sqrt(rounds x local_steps) x batch / sigma

    def examples_per_round(self) -> int:
        """Records drawn per round on average: the plan's compute."""
        return self.batch * self.local_steps


def score(batch: int, total_steps: int, sigma: float) -> float:
    """The signal-to-noise score ``sqrt(T) B / σ`` of a plan with ``total_steps`` steps in all."""
    return math.sqrt(total_steps) * batch / sigma


def candidates(*, epsilon_budget: float, delta: float, records: int, rounds: int,
               batches: tuple[int, ...] | None = None, steps: tuple[int, ...] | None = None) -> list[Plan]:
    """Every (batch, steps) of the grid (default :data:`BATCHES` x :data:`STEPS`) that fits the budget, best score
    first (batches up to records / 2).

    Raises:
        ConfigError: No plan of the grid fits (too few records, or a budget too small for them).
    """
    if records < 2 or rounds < 1:
        raise ConfigError(f"records ({records}) must be at least 2 and rounds ({rounds}) at least 1")
    batches, steps = batches or BATCHES, steps or STEPS
    plans = []
    for b in (b for b in batches if b <= records // 2):
        for t in steps:
            sigma = calibrate_noise(epsilon_budget=epsilon_budget, delta=delta, spent=[], q=b / records,
                                    steps=rounds * t, accountant="rdp", tolerance=0.02)
            if sigma is not None:
                plans.append(Plan(b, t, sigma, score(b, rounds * t, sigma)))
    if not plans:
        raise ConfigError(f"no batch of {list(batches)} up to {records // 2} records with {list(steps)} steps per "
                          f"round fits epsilon {epsilon_budget} over {rounds} rounds. Fix: raise the budget, plan "
                          "fewer rounds, or use more records.")
    return sorted(plans, key=lambda p: (-p.score, p.examples_per_round()))


def suggest(plans: list[Plan], tolerance: float = 0.05) -> Plan:
    """The plan with the fewest examples per round whose score is within ``tolerance`` of the best (ties: the
    smaller batch).
    """
    best = max(p.score for p in plans)
    near = [p for p in plans if p.score >= (1 - tolerance) * best]
    return min(near, key=lambda p: (p.examples_per_round(), p.batch))
