r"""Each release as a machine-readable mechanism, and ε recomputed from it by an independent implementation.

A DP-SGD release of one round is ``steps`` Poisson-subsampled Gaussian mechanisms (noise multiplier σ,
sampling rate q). :func:`describe` writes a history of releases as Google dp-accounting ``DpEvent``\\ s in the
field names of ``DpEvent.to_named_tuple()`` (plain JSON: ``class_name`` plus fields), so anyone can rebuild the
events with dp-accounting and recompute ε. :func:`recompute` does exactly that, from the JSON: PLD (pessimistic
estimate) for sites accounted with PRV, RDP (with Opacus' orders) for sites accounted with RDP. The figures come
from another code base than the sites' own Opacus accountants, which is the point of showing both.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from fedsecure.privacy.accounting import Spend, merge_spends

#: Relative tolerance between the sites' ε and the independent recomputation, beyond which the report flags it...
TOLERANCE = 0.005
#: ... or, for small ε, an absolute 0.02: Opacus' PRV accountant is run with an absolute error of 0.01 and reports the
#: upper end of its interval, while PLD's pessimistic estimate sits at or above the true ε, so the two may differ by
#: up to twice that error.
ABS_TOLERANCE = 0.02
#: PLD's discretisation of the privacy-loss distribution (dp-accounting's default is 1e-4; 1e-3 stays within
#: 0.1% of it here and is 7x faster).
PLD_INTERVAL = 1e-3

Release = tuple[float, float, int]  # (sigma, q, steps)


def library_version(dist: str) -> str:
    """An installed distribution's version, or "absent"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def describe(history: Sequence[Release]) -> dict[str, Any]:
    """The releases as one composed ``DpEvent`` (dp-accounting's named-tuple fields, JSON)."""
    events = [{"class_name": "SelfComposedDpEvent", "count": int(n),
               "event": {"class_name": "PoissonSampledDpEvent", "sampling_probability": float(q),
                         "event": {"class_name": "GaussianDpEvent", "noise_multiplier": float(sigma)}}}
              for sigma, q, n in history if n > 0]
    return {"module_name": "dp_accounting.dp_event", "class_name": "ComposedDpEvent", "events": events}


def releases_of(description: Mapping[str, Any]) -> tuple[Release, ...]:
    """The (σ, q, steps) of a description written by :func:`describe` (the inverse, for the recomputation).

    Raises:
        ValueError: The description is not the composition of subsampled Gaussians :func:`describe` writes.
    """
    if description.get("class_name") != "ComposedDpEvent":
        raise ValueError(f"not a ComposedDpEvent: {description.get('class_name')!r}")
    out = []
    for ev in description["events"]:
        inner = ev["event"]
        gauss = inner["event"]
        if (ev["class_name"], inner["class_name"], gauss["class_name"]) != (
                "SelfComposedDpEvent", "PoissonSampledDpEvent", "GaussianDpEvent"):
            raise ValueError(f"unsupported mechanism {ev['class_name']}/{inner['class_name']}/{gauss['class_name']}")
        out.append((float(gauss["noise_multiplier"]), float(inner["sampling_probability"]), int(ev["count"])))
    return tuple(out)


def to_dp_event(description: Mapping[str, Any]) -> Any:
    """The description as dp-accounting ``DpEvent`` objects."""
    from dp_accounting import dp_event

    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
        for sigma, q, n in releases_of(description)])


def method(accountant: str) -> str:
    """Which dp-accounting accountant recomputes a site's ε, in words."""
    if accountant == "rdp":
        return f"dp-accounting {library_version('dp-accounting')} RdpAccountant (Opacus' orders)"
    return f"dp-accounting {library_version('dp-accounting')} PLDAccountant (pessimistic, interval {PLD_INTERVAL:g})"


def recompute(description: Mapping[str, Any], delta: float, accountant: str) -> float:
    """ε of the described releases at ``delta`` by dp-accounting (PLD for ``prv``, RDP for ``rdp``)."""
    history = merge_spends(Spend(*r) for r in releases_of(description))
    return _recompute(history, float(delta), "rdp" if accountant == "rdp" else "pld")


@lru_cache(maxsize=4096)
def _recompute(history: tuple[Release, ...], delta: float, kind: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    event = to_dp_event(describe(history))
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP notes orders it drops; the bound stays valid
    if kind == "rdp":
        from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
        from opacus.accountants import RDPAccountant

        acc: Any = RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    else:
        from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

        acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    acc.compose(event)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def agreement(reported: float | None, recomputed: float | None) -> dict[str, Any]:
    """How the sites' ε and the recomputation compare, and the figure to show (the larger: never optimistic)."""
    if reported is None or recomputed is None:
        return {"relative_difference": None, "within_tolerance": None, "shown": reported if recomputed is None
                else recomputed}
    if math.isinf(reported) or math.isinf(recomputed):
        return {"relative_difference": None, "within_tolerance": math.isinf(reported) == math.isinf(recomputed),
                "shown": math.inf}
    base = max(abs(reported), 1e-12)
    rel = (recomputed - reported) / base
    return {"relative_difference": rel,
            "within_tolerance": abs(recomputed - reported) <= max(TOLERANCE * abs(reported), ABS_TOLERANCE),
            "shown": max(reported, recomputed)}
