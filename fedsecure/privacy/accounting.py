"""Privacy accounting through Opacus' accountants: PRV by default, RDP as an option.

A site's spending is a list of :class:`Spend` events, each a Poisson-subsampled Gaussian
mechanism run ``steps`` times (noise multiplier ``sigma``, sampling rate ``q``). We never
hand-roll an accountant: :func:`epsilon_of` hands the events to the accountant registered under
its name (:data:`REGISTRY`, a dict plus :func:`register_accountant`, as Opacus'
``accountants/registry.py``): Opacus' ``PRVAccountant`` (the upper bound of its estimate) or
``RDPAccountant``. The Gaussian/CLT accountant (``gdp``) is refused, because it can under-report ε.

Bounded cost: PRV discretises the privacy loss on a grid whose size grows with the RDP bound of
the history and with the square root of the steps (about 180 bytes per point). Before running it,
:func:`prv_grid_points` predicts that size with the cheap RDP accountant; past
:data:`MAX_PRV_POINTS` the RDP bound is reported instead. Both are sound upper bounds, so the
fallback is never optimistic; it only happens where ε is already far beyond any sensible budget
or the history is enormous, and it keeps one message from making a site allocate gigabytes.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedsecure.config import ACCOUNTANTS, check_accountant
from fedsecure.errors import ConfigError

__all__ = ["ACCOUNTANTS", "REGISTRY", "Spend", "calibrate_noise", "check_accountant", "default_delta", "epsilon_of",
           "register_accountant"]

History = tuple[tuple[float, float, int], ...]  # (sigma, q, steps) with q > 0, merged
#: ε of a history at a delta, by accountant name (names are ``fedsecure.config.ACCOUNTANTS``).
REGISTRY: dict[str, Callable[[History, float], float]] = {}


def register_accountant(name: str, epsilon: Callable[[History, float], float], *, force: bool = False) -> None:
    """Make ``epsilon(history, delta)`` the accountant called ``name`` (``force`` to replace one)."""
    if name in REGISTRY and not force:
        raise ValueError(f"accountant {name!r} is already registered")
    REGISTRY[name] = epsilon


def _opacus(history: History, delta: float, make: Callable[[], object], **kwargs: float) -> float:
    acc = make()
    acc.history = list(history)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        # prvs.py takes log(0) on a masked branch for q close to 1; the result is still finite
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\..*")
        # RDP (also used inside PRV to size its domain) notes when a larger order might be
        # tighter: the bound returned is still valid, only possibly looser (never optimistic)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        return float(acc.get_epsilon(delta, **kwargs))  # type: ignore[attr-defined]


def _rdp(history: History, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    return _opacus(history, delta, RDPAccountant)


def _prv(history: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    if prv_grid_points(history, delta) > MAX_PRV_POINTS:
        return _rdp(history, delta)  # a sound, looser bound at a bounded cost (module docstring)
    return _opacus(history, delta, PRVAccountant, eps_error=PRV_EPS_ERROR)
#: Absolute ε error allowed in the PRV computation; PRV returns the *upper* end of it.
PRV_EPS_ERROR = 0.01
#: Largest noise multiplier calibration will consider; needing more means the budget is gone.
SIGMA_MAX = 64.0
SIGMA_MIN = 0.3
#: Largest PRV grid (points) computed; beyond it the RDP bound is used (see the module docstring).
MAX_PRV_POINTS = 1 << 22


@dataclass(frozen=True)
class Spend:
    """One accounted release: ``steps`` DP-SGD steps at noise ``sigma`` and sampling rate ``q``."""

    sigma: float
    q: float
    steps: int


def default_delta(num_records: int) -> float:
    """δ = min(1e-5, 1/(10·N)): well below 1/N, as DP requires to be meaningful."""
    return min(1e-5, 1.0 / (10.0 * max(1, num_records)))


def merge_spends(spends: Iterable[Spend]) -> tuple[tuple[float, float, int], ...]:
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
    return _epsilon(merge_spends(spends), float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: History, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    if all(q == 0 for _, q, _ in history):
        return 0.0
    eps = REGISTRY[accountant](tuple(h for h in history if h[1] > 0), delta)
    return eps if math.isfinite(eps) else math.inf


def prv_grid_points(history: History, delta: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """Points of the grid Opacus' PRV accountant would build for ``history`` (its ``_get_domain``), from RDP."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    total = sum(n for _, _, n in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\.accountants\..*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\..*")
        rdp = RDPAccountant()
        rdp.history = list(history)
        size = rdp.get_epsilon(delta_error / 4)
        for sigma, q, _ in history:
            one = RDPAccountant()
            one.history = [(sigma, q, 1)]
            size = max(size, one.get_epsilon(delta_error / (8 * total)))
    size = max(float(size), eps_error) + 3
    if not math.isfinite(size):
        return math.inf
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return 2 * size / mesh


def calibrate_noise(*, epsilon_budget: float, delta: float, spent: Sequence[Spend], q: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.01, sigma_min: float = SIGMA_MIN) -> float | None:
    """Smallest σ ≥ ``sigma_min`` (to ``tolerance`` in ε) whose ``steps`` more steps keep ε ≤ ``epsilon_budget``.

    ``spent`` is what the dataset has already spent. Returns None when even ``SIGMA_MAX`` would
    overshoot (the budget is exhausted). The result never overshoots: the returned σ is checked.
    """
    return _calibrate(float(epsilon_budget), float(delta), merge_spends(spent), float(q), int(steps), accountant,
                      float(tolerance), float(sigma_min))


@lru_cache(maxsize=256)
def _calibrate(target: float, delta: float, spent: tuple[tuple[float, float, int], ...], q: float, steps: int,
               accountant: str, tolerance: float, sigma_min: float = SIGMA_MIN) -> float | None:
    check_accountant(accountant)
    if not (math.isfinite(target) and target > 0 and 0 < delta < 1 and 0 < q <= 1 and steps >= 1
            and SIGMA_MIN <= sigma_min < SIGMA_MAX):
        raise ConfigError(f"cannot calibrate sigma for epsilon={target}, delta={delta}, q={q}, steps={steps}, "
                          f"sigma_min={sigma_min}: each must be finite and in range (epsilon > 0, 0 < delta < 1, "
                          "0 < q <= 1, steps >= 1)")
    spends = [Spend(*h) for h in spent]

    def eps(sigma: float) -> float:
        return epsilon_of([*spends, Spend(sigma, q, steps)], delta, accountant)

    floor = sigma_min
    lo, hi = floor, SIGMA_MAX
    bracketed = False
    if accountant == "prv":
        # RDP bounds are not below PRV's, so the RDP-calibrated sigma is (checked) feasible for PRV,
        # and PRV's answer is within ~20% below it: a cheap, tight bracket for the costly PRV search
        # (one PRV evaluation at sigma=64 alone takes seconds).
        rdp_sigma = _calibrate(target, delta, spent, q, steps, "rdp", tolerance, sigma_min)
        if rdp_sigma is not None and eps(rdp_sigma) <= target:
            lo, hi, bracketed = max(floor, rdp_sigma * 0.7), rdp_sigma, True
            if eps(lo) <= target:
                if lo <= floor:
                    return floor
                bracketed = False
    if not bracketed:
        # grow from a typical sigma rather than starting at SIGMA_MAX: large sigmas are slow to account
        hi = max(2.0, floor)
        while eps(hi) > target:
            if hi >= SIGMA_MAX:
                return None
            hi = min(SIGMA_MAX, hi * 2)
        lo = max(floor, hi / 2)
        while eps(lo) <= target:
            if lo <= floor:
                return floor
            hi, lo = lo, max(floor, lo / 2)
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
    if eps(hi) > target:  # cannot happen (hi is always a feasible point); never return an overshooting sigma
        return None
    return hi


register_accountant("prv", _prv)
register_accountant("rdp", _rdp)
