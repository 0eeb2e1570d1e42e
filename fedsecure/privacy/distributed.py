r"""Client-level DP with the noise added at the sites: the distributed discrete Gaussian (DDG), its accounting.

The sites' and the coordinator's steps are :mod:`fedsecure.secagg.ddg`; this module holds the bounds and the
privacy accounting they rest on.

Under secure aggregation the coordinator sees only the sum of the sites' updates, so it can neither clip one
site's update nor noise it. Kairouz, Liu & Steinke (ICML 2021, arXiv 2102.06387) move both to the sites:

1. **Clip** (site): the adapter delta, all tensors as one vector of ``d`` values, to L2 norm ``S``.
2. **Scale and round** (site): divide by the granularity ``γ`` and round each value up or down at random
   (unbiased), repeating until the rounded vector's L2 norm is at most ``Δ₂`` (conditional randomized
   rounding; ``Δ₂`` from :func:`rounded_l2`, exceeded with probability at most ``β`` a try). The rounding is
   what makes the sensitivity an integer-vector bound: ``Δ₂`` instead of ``S/γ``, about 1% more
   (:data:`INFLATION`, from which :func:`granularity` picks ``γ``).
3. **Noise** (site): add discrete Gaussian noise ``N_Z(0, σ²)`` to every value, sampled exactly by OpenDP
   (``make_gaussian`` on integers: rational arithmetic, OpenSSL's generator; no float to attack).
   ``σ² = (σ_c Δ₂)² / t`` where ``t`` is the fewest sites whose inputs a released round can sum (the secure
   aggregation threshold): any released sum carries at least the variance ``(σ_c Δ₂)²`` of the central
   mechanism with noise multiplier ``σ_c``.
4. **Sum** (secure aggregation): the coordinator learns only ``Σ`` of the sites' integer vectors, mod a
   modulus sized so the sum does not wrap (:mod:`fedsecure.secagg.ddg`: each site's values within ``Δ₂ + 12 σ``).

Accounting (Proposition 14 of the paper, the form Google's ``distributed_dp`` code computes): the sum of ``n``
sites' noise is ``ρ``-zCDP for one site's contribution (add/remove a site) with
``ρ = ½ min{(Δ₂/(√n σ) + √d τ)², (Δ₂/(√n σ))² + 2 Δ₁ τ/(√n σ) + τ² d}`` where
``τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1))``. ``n`` is the number of sites *in the sum*, known once the
round is unmasked: sites that dropped before masking took their noise with them, and the ρ says so.
Rounds compose by adding ρ (:func:`epsilon`: dp-accounting's ``RdpAccountant`` over ``ZCDpEvent``\ s,
converted to (ε, δ)). No amplification by sampling the sites is claimed (``q`` is taken as 1): that is
never optimistic. :func:`independent_epsilon` converts the same ρ with Opacus' RDP code, a second
implementation, and the report shows the larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Probability bound ``β`` of one rounding try exceeding ``Δ₂`` (the paper's choice, e^-1/2).
BETA = math.exp(-0.5)
#: Granularity: the rounded vector's L2 bound exceeds the clip by at most this fraction.
INFLATION = 0.01
#: Sites' noise must be at least this (in units of the granularity) for the accounting's theorem to hold.
MIN_SIGMA = 0.5
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 128, 256, 512, 1024])


def rounded_l2(c: float, dim: int, beta: float = BETA) -> float:
    """The L2 bound a conditionally rounded vector of norm ``<= c`` (in units of ``γ``) is held to."""
    half = math.sqrt(dim) / 2.0
    squared = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + half)
    return min(c + half, math.sqrt(squared))


def rounded_l1(l2: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm ``<= l2``: ``|z_j| <= z_j²`` and Cauchy-Schwarz."""
    return min(l2 * l2, math.sqrt(dim) * l2)


def granularity(clip: float, dim: int, inflation: float = INFLATION) -> float:
    """The largest ``γ`` (coarsest grid) whose rounding inflates the L2 bound ``clip/γ`` by at most ``inflation``."""
    lo, hi = 0.0, 40.0  # log2 of c = clip / γ
    if rounded_l2(2.0**hi, dim) > (1 + inflation) * 2.0**hi:
        raise ValueError(f"no granularity keeps the rounding within {inflation:.0%} for {dim} values")
    for _ in range(100):
        mid = (lo + hi) / 2
        if rounded_l2(2.0**mid, dim) <= (1 + inflation) * 2.0**mid:
            hi = mid
        else:
            lo = mid
    return clip / 2.0**hi


def rho(l2: float, sigma: float, dim: int, sites: int) -> float:
    """The zCDP ``ρ`` of one round whose sum holds ``sites`` sites' inputs and noise: each site's rounded vector
    within ``l2`` and noise ``N_Z(0, sigma²)`` (grid units), ``dim`` values (module docstring).
    """
    if sites < 1:
        raise ValueError("a released round sums at least one site")
    s, d = sigma, dim
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * s * s * k / (k + 1)) for k in range(1, sites))
    l1 = rounded_l1(l2, d) / (math.sqrt(sites) * s)
    l2 = l2 / (math.sqrt(sites) * s)
    return 0.5 * min((l2 + math.sqrt(d) * tau) ** 2, l2 * l2 + 2.0 * l1 * tau + tau * tau * d)


def epsilon(rhos: Sequence[float], delta: float) -> float:
    """ε at ``delta`` of rounds with these ρ: dp-accounting's RdpAccountant over its ``ZCDpEvent``."""
    if not rhos:
        return 0.0
    from dp_accounting import dp_event
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = RdpAccountant(orders=list(ORDERS))
    acc.compose(dp_event.ComposedDpEvent([dp_event.ZCDpEvent(float(r)) for r in rhos]))
    return float(acc.get_epsilon(delta))


def independent_epsilon(rhos: Sequence[float], delta: float) -> float:
    """The same ε by Opacus' RDP-to-(ε, δ) conversion: a second implementation for the cross-check."""
    if not rhos:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.asarray(ORDERS, dtype=np.float64)
    eps, _ = get_privacy_spent(orders=orders, rdp=orders * float(sum(rhos)), delta=delta)
    return float(eps)
