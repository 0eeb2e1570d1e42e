"""Privacy accounting through Opacus' accountants: PRV by default, RDP as an option.

A site's spending is a list of :class:`Spend` events, each a Poisson-subsampled Gaussian
mechanism run ``steps`` times (noise multiplier ``sigma``, sampling rate ``q``). We never
hand-roll an accountant: :func:`epsilon_of` hands the events to Opacus' ``PRVAccountant``
(the upper bound of its estimate) or ``RDPAccountant``. The Gaussian/CLT accountant (``gdp``)
is refused, because it can under-report ε.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedsecure.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
#: Absolute ε error allowed in the PRV computation; PRV returns the *upper* end of it.
PRV_EPS_ERROR = 0.01
#: Largest noise multiplier calibration will consider; needing more means the budget is gone.
SIGMA_MAX = 64.0
SIGMA_MIN = 0.3


@dataclass(frozen=True)
class Spend:
    """One accounted release: ``steps`` DP-SGD steps at noise ``sigma`` and sampling rate ``q``."""

    sigma: float
    q: float
    steps: int


def check_accountant(name: str) -> str:
    if name in ("gdp", "gaussian", "clt"):
        raise ConfigError(f"privacy.accountant: {name!r} (the Gaussian/CLT accountant) can under-report epsilon "
                          "and is refused. Fix: use 'prv' (default, tightest sound bound) or 'rdp'.")
    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant: expected one of {', '.join(ACCOUNTANTS)}; found {name!r}.")
    return name


def default_delta(num_records: int) -> float:
    """δ = min(1e-5, 1/(10·N)): well below 1/N, as DP requires to be meaningful."""
    return min(1e-5, 1.0 / (10.0 * max(1, num_records)))


def _merge(spends: Iterable[Spend]) -> tuple[tuple[float, float, int], ...]:
    # Composition only depends on the multiset of (sigma, q) with their step counts, so equal
    # mechanisms are merged: that keeps PRV fast over hundreds of rounds.
    merged: OrderedDict[tuple[float, float], int] = OrderedDict()
    for s in spends:
        if s.steps > 0:
            merged[(float(s.sigma), float(s.q))] = merged.get((float(s.sigma), float(s.q)), 0) + int(s.steps)
    return tuple((sigma, q, n) for (sigma, q), n in merged.items())


def epsilon_of(spends: Sequence[Spend], delta: float, accountant: str = "prv") -> float:
    """ε after ``spends`` at ``delta`` (an upper bound for PRV)."""
    check_accountant(accountant)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"privacy.delta must be in (0, 1); found {delta}.")
    return _epsilon(_merge(spends), float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    if all(q == 0 for _, q, _ in history):
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [h for h in history if h[1] > 0]
    with warnings.catch_warnings():
        # prvs.py takes log(0) on a masked branch for q close to 1; the result is still finite
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\..*")
        # RDP (also used inside PRV to size its domain) notes when a larger order might be
        # tighter: the bound returned is still valid, only possibly looser (never optimistic)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        if accountant == "prv":
            eps = acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)
        else:
            eps = acc.get_epsilon(delta)
    eps = float(eps)
    return eps if math.isfinite(eps) else math.inf


def calibrate_noise(*, target_epsilon: float, delta: float, spent: Sequence[Spend], q: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.01) -> float | None:
    """Smallest σ (to ``tolerance`` in ε) whose ``steps`` more steps keep ε ≤ ``target_epsilon``.

    ``spent`` is what the dataset has already spent. Returns None when even ``SIGMA_MAX`` would
    overshoot (the budget is exhausted). The result never overshoots: the returned σ is checked.
    """
    return _calibrate(float(target_epsilon), float(delta), _merge(spent), float(q), int(steps), accountant,
                      float(tolerance))


@lru_cache(maxsize=256)
def _calibrate(target: float, delta: float, spent: tuple[tuple[float, float, int], ...], q: float, steps: int,
               accountant: str, tolerance: float) -> float | None:
    check_accountant(accountant)
    spends = [Spend(*h) for h in spent]

    def eps(sigma: float) -> float:
        return epsilon_of([*spends, Spend(sigma, q, steps)], delta, accountant)

    lo, hi = SIGMA_MIN, SIGMA_MAX
    bracketed = False
    if accountant == "prv":
        # RDP bounds are not below PRV's, so the RDP-calibrated sigma is (checked) feasible for PRV,
        # and PRV's answer is within ~20% below it: a cheap, tight bracket for the costly PRV search
        # (one PRV evaluation at sigma=64 alone takes seconds).
        rdp_sigma = _calibrate(target, delta, spent, q, steps, "rdp", tolerance)
        if rdp_sigma is not None and eps(rdp_sigma) <= target:
            lo, hi, bracketed = max(SIGMA_MIN, rdp_sigma * 0.7), rdp_sigma, True
            if lo > SIGMA_MIN and eps(lo) <= target:
                bracketed = False
    if not bracketed:
        # grow from a typical sigma rather than starting at SIGMA_MAX: large sigmas are slow to account
        hi = 2.0
        while eps(hi) > target:
            if hi >= SIGMA_MAX:
                return None
            hi = min(SIGMA_MAX, hi * 2)
        lo = hi / 2
        while eps(lo) <= target:
            if lo <= SIGMA_MIN:
                return SIGMA_MIN
            hi, lo = lo, max(SIGMA_MIN, lo / 2)
    # eps(lo) > target >= eps(hi); bisect in log space on the monotone ε(σ)
    while True:
        mid = math.sqrt(lo * hi)
        e = eps(mid)
        if e > target:
            lo = mid
        else:
            hi = mid
            if target - e <= tolerance:
                break
        if hi / lo < 1.0 + 1e-4:
            break
    assert eps(hi) <= target  # hi is always a feasible point
    return hi
