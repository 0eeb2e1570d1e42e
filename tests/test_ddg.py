"""The distributed discrete Gaussian: rounding, noise, the sum's variance, and its accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedsecure.errors import SecAggError
from fedsecure.privacy import distributed
from fedsecure.secagg import ddg


def test_conditional_rounding_stays_within_its_bound_and_is_unbiased(monkeypatch):
    monkeypatch.setattr(ddg, "discrete_gaussian", lambda sigma, size: np.zeros(size, np.int64))
    rng = np.random.default_rng(0)
    d = 400
    params = ddg.plan(1.0, 1.0, d, 2)
    x = rng.normal(size=d)
    x *= 3.0 / np.linalg.norm(x)  # beyond the clip: scaled down to norm 1
    draws = np.stack([ddg.encode({"w": x}, params, rng=rng) for _ in range(3000)])
    assert np.all(np.linalg.norm(draws, axis=1) <= params.l2)
    target = x / np.linalg.norm(x) / params.gamma
    # each value rounds up or down, to a neighbour of its scaled value, and is right on average
    assert np.all(np.abs(draws - target) < 1.0)
    stderr = 0.5 / math.sqrt(len(draws))
    assert np.max(np.abs(draws.mean(axis=0) - target)) < 5 * stderr


def test_the_granularity_keeps_the_sensitivity_within_one_percent_of_the_clip():
    for d in (10, 15232, 2_000_000):
        g = distributed.granularity(0.7, d)
        c = 0.7 / g
        assert distributed.rounded_l2(c, d) <= 1.01 * c + 1e-9
        # and it is the coarsest such grid: 1% coarser breaks it
        assert distributed.rounded_l2(c / 1.01, d) > 1.01 * c / 1.01


def test_the_sampler_draws_the_discrete_gaussian():
    sigma, n = 2.5, 200_000
    x = ddg.discrete_gaussian(sigma, n)
    ks = np.arange(-15, 16)
    pmf = np.exp(-ks.astype(float) ** 2 / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([(x == k).sum() for k in ks])
    keep = pmf * n > 5
    chi2 = ((observed[keep] - n * pmf[keep]) ** 2 / (n * pmf[keep])).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4
    assert np.all(np.abs(x) <= 15 * sigma)


def test_the_variance_of_the_sum_is_the_central_mechanisms(monkeypatch):
    d, clip, sigma_c, t = 20_000, 0.5, 0.8, 3
    params = ddg.plan(clip, sigma_c, d, t)
    zero = {"w": np.zeros(d)}
    for sites in (t, t + 2):  # the threshold's worth of sites, and more (more noise, never less)
        total = sum(ddg.encode(zero, params) for _ in range(sites)).astype(np.float64)
        target = (sigma_c * params.l2) ** 2 * sites / t  # in grid units
        # the sample variance of d values is within 5 standard errors of the target
        assert abs(total.var() / target - 1) < 5 * math.sqrt(2 / d)
    # in the update's units the threshold's noise is σ_c times the clip, inflated by the rounding (at most 1%)
    std = math.sqrt(t) * params.sigma * params.gamma
    assert sigma_c * clip <= std <= 1.011 * sigma_c * clip


def test_rho_is_the_central_gaussians_at_the_threshold_and_smaller_with_more_sites():
    params = ddg.plan(1.0, 1.3, 15_232, 3)
    central = 1 / (2 * 1.3**2)
    assert params.rho(3) == pytest.approx(central, rel=1e-9)  # τ vanishes at these σ
    assert params.rho(4) == pytest.approx(central * 3 / 4, rel=1e-9)
    assert params.rho(2) > central  # a dropout before masking: less noise, a larger ρ (never under-reported)


def test_rho_at_small_noise_follows_proposition_14():
    # a small σ (in grid steps) where τ matters: the bound, recomputed here term by term
    l2, sigma, d, n = 3.0, 0.6, 50, 4
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    a, b = l2 / (math.sqrt(n) * sigma), min(l2**2, math.sqrt(d) * l2) / (math.sqrt(n) * sigma)
    expected = 0.5 * min((a + math.sqrt(d) * tau) ** 2, a**2 + 2 * b * tau + tau**2 * d)
    assert tau > 1e-3 and distributed.rho(l2, sigma, d, n) == pytest.approx(expected, rel=1e-12)
    assert distributed.rho(l2, sigma, d, n) > a**2 / 2  # never below the continuous Gaussian's


def test_epsilon_agrees_with_two_independent_implementations():
    from opacus.accountants import RDPAccountant

    sigma_c, rounds, delta = 1.1, 6, 1e-5
    params = ddg.plan(1.0, sigma_c, 15_232, 2)
    rhos = [params.rho(2)] * rounds
    eps = distributed.epsilon(rhos, delta)
    # Opacus' RDP-to-(ε, δ) conversion of the same ρ
    assert distributed.independent_epsilon(rhos, delta) == pytest.approx(eps, rel=1e-3)
    # and Opacus' own accountant for the central Gaussian with σ_c, every site every round: the same mechanism
    acc = RDPAccountant()
    acc.history = [(sigma_c, 1.0, rounds)]
    assert acc.get_epsilon(delta) == pytest.approx(eps, rel=0.02)


@pytest.mark.parametrize(("doc", "why"), [
    ({"clip": 1.0, "gamma": 0.01, "sigma": 3.0}, "malformed"),
    ({"clip": 1.0, "gamma": 0.01, "sigma": "x", "dim": 5}, "not numbers"),
    ({"clip": -1.0, "gamma": 0.01, "sigma": 3.0, "dim": 5}, "clip is -1.0"),
    ({"clip": 1.0, "gamma": float("nan"), "sigma": 3.0, "dim": 5}, "gamma is nan"),
    ({"clip": 1.0, "gamma": 0.01, "sigma": 0.2, "dim": 5}, "below 0.5"),
    ({"clip": 1.0, "gamma": 0.01, "sigma": 3.0, "dim": 0}, "dimension is 0"),
    ("noise", "malformed"),
])
def test_a_site_refuses_malformed_noise_parameters_by_name(doc, why):
    with pytest.raises(SecAggError, match=why):
        ddg.DDGRound.from_dict(doc)


def test_a_site_refuses_an_update_that_does_not_fit_the_round():
    params = ddg.plan(1.0, 1.0, 10, 2)
    with pytest.raises(SecAggError, match="holds 9 values"):
        ddg.encode({"w": np.zeros(9)}, params)
    with pytest.raises(SecAggError, match="not finite"):
        ddg.encode({"w": np.array([0.0] * 9 + [np.inf])}, params)


def test_the_modulus_holds_the_noised_sum_and_decode_divides_by_the_sites_asked():
    d = 3000
    params = ddg.plan(0.2, 1.0, d, 2)
    rng = np.random.default_rng(1)
    updates = [{"a": rng.normal(size=(d // 2,)) * 0.003, "b": rng.normal(size=(d // 2,)) * 0.003} for _ in range(3)]
    vectors = [ddg.encode(u, params) for u in updates]
    total = sum(vectors)
    assert np.max(np.abs(total)) < 2 ** (params.bits(3) - 1)
    out = ddg.decode(total, params, 4, {"a": (d // 2,), "b": (d // 2,)})
    flat = np.concatenate([out["a"], out["b"]])
    np.testing.assert_allclose(flat, (total * params.gamma / 4).astype(np.float32))
    # the mean is unbiased around the sum of the (unclipped: norms below 0.2) updates over the sites asked
    truth = sum(np.concatenate([u["a"], u["b"]]) for u in updates) / 4
    noise_std = math.sqrt(3) * params.sigma * params.gamma / 4
    assert abs(float(np.mean(flat - truth))) < 5 * noise_std / math.sqrt(d)
