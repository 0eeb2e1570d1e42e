"""The site's own privacy policy against the run's request: the policy wins, the request can only tighten it.

A coordinator (ours or not) asks for privacy settings through the run config. The site holds its own
:class:`~fedsecure.config.SitePolicy` and :class:`~fedsecure.config.SiteLimits`; :func:`resolve` turns the
request into the :class:`Terms` of one round, or a :class:`PolicyRefusal` that names the key, both values
and the fix. Nothing here silently clamps: a request looser than the policy is refused, so both sides see
that the coordinator asked for more privacy loss than the site allows.

Rules (each is a refusal when broken):

- ``privacy.enabled = false`` needs a site whose policy says ``dp_required: false``.
- ``privacy.epsilon_budget`` and ``privacy.delta``, when set, are at most the policy's; null takes the policy's.
- The site's delta is below ``1/N`` (N = its training records): with ``delta >= 1/N`` a mechanism that
  publishes one random record outright is (0, delta)-DP, so such a delta promises nothing.
- ``privacy.noise_multiplier``, when fixed, is at least ``min_sigma``; a calibrated sigma never goes below it.
- ``privacy.max_grad_norm`` is at most ``max_clip``; ``privacy.accountant`` is one the policy lists.
- ``train.local_steps``, ``train.batch_size``, ``data.max_length`` and ``model.lora.r`` stay within the
  site's limits, so no message can make the site spend unbounded time or memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsecure.config import SimulationConfig, SiteLimits, SitePolicy


@dataclass(frozen=True)
class Terms:
    """What one round at this site will be held to (the policy, tightened by the request)."""

    private: bool
    epsilon_budget: float  # the budget this round's check uses (over the dataset's whole history)
    delta: float
    clip: float
    sigma: float | None  # fixed by the run, or None: calibrated from the remaining budget
    min_sigma: float
    accountant: str
    steps: int
    batch_size: int


@dataclass(frozen=True)
class PolicyRefusal:
    """The run asks for more than this site allows: nothing is trained; the reason names key, values and fix."""

    key: str
    reason: str


def site_delta(policy: SitePolicy, num_records: int) -> float:
    """The site's delta: its policy's ``delta``, or min(1e-5, 1/(10 N))."""
    if policy.delta is not None:
        return float(policy.delta)
    return min(1e-5, 1.0 / (10.0 * max(1, num_records)))


def check_delta(delta: float, num_records: int, key: str) -> str | None:
    """A reason when ``delta`` is not below 1/N, else None."""
    if num_records >= 1 and delta < 1.0 / num_records:
        return None
    return (f"{key}: delta {delta:g} is not below 1/N = 1/{num_records} = {1.0 / max(1, num_records):.3g} "
            "(N = the site's training records). With delta >= 1/N, publishing one random record outright is "
            f"(0, delta)-DP, so the guarantee would promise nothing. Fix: use delta <= 1/(10 N), e.g. "
            f"{1.0 / (10 * max(1, num_records)):.1e}, or leave it null for min(1e-5, 1/(10 N)).")


def _looser(key: str, asked: object, allowed: object, site_key: str, fix: str) -> PolicyRefusal:
    return PolicyRefusal(key, f"{key}: the run asks for {asked} but this site allows {allowed} "
                              f"({site_key}). Fix: {fix}.")


def check_limits(policy: SitePolicy, limits: SiteLimits, cfg: SimulationConfig) -> PolicyRefusal | None:
    """The run's sizes (steps, batch, sequence length, LoRA rank) against the site's limits, checked before the
    site loads or allocates anything for the message.
    """
    train = cfg.train
    if policy.require_secure_aggregation and not cfg.federation.secure_aggregation.enabled:
        return _looser("federation.secure_aggregation.enabled", "false (each update sent to the coordinator as it "
                       "is)", "only masked updates", "site.privacy.require_secure_aggregation",
                       "the coordinator runs with federation.secure_aggregation.enabled: true and the consortium's "
                       "roster (docs/secure-aggregation.md)")
    if train.local_steps > policy.max_steps_per_round:
        return _looser("train.local_steps", train.local_steps, f"at most {policy.max_steps_per_round}",
                       "site.privacy.max_steps_per_round",
                       f"the coordinator sets train.local_steps <= {policy.max_steps_per_round}")
    if train.batch_size > policy.max_batch_size:
        return _looser("train.batch_size", train.batch_size, f"at most {policy.max_batch_size}",
                       "site.privacy.max_batch_size",
                       f"the coordinator sets train.batch_size <= {policy.max_batch_size}")
    if cfg.data.max_length > limits.max_seq_len:
        return _looser("data.max_length", cfg.data.max_length, f"at most {limits.max_seq_len}",
                       "site.limits.max_seq_len", f"the coordinator sets data.max_length <= {limits.max_seq_len}")
    if cfg.model.lora.r > limits.max_lora_rank:
        return _looser("model.lora.r", cfg.model.lora.r, f"at most {limits.max_lora_rank}",
                       "site.limits.max_lora_rank", f"the coordinator sets model.lora.r <= {limits.max_lora_rank}")
    return None


def resolve(policy: SitePolicy, limits: SiteLimits, cfg: SimulationConfig, num_records: int) -> Terms | PolicyRefusal:
    """The terms of one round at a site with ``num_records`` training records, or the refusal."""
    req, train = cfg.privacy, cfg.train
    if not req.enabled and policy.dp_required:
        return _looser("privacy.enabled", "false (no differential privacy)", "only private training",
                       "site.privacy.dp_required: true",
                       "the coordinator sets privacy.enabled=true; a site that may train without DP says so in its "
                       "own config (site.privacy.dp_required: false)")
    too_big = check_limits(policy, limits, cfg)
    if too_big is not None:
        return too_big
    own_delta = site_delta(policy, num_records)
    bad = check_delta(own_delta, num_records, "site.privacy.delta")
    if bad is not None:
        return PolicyRefusal("site.privacy.delta", bad)
    if not req.enabled:  # a non-private round, which this site's own policy allows
        return Terms(private=False, epsilon_budget=math.inf, delta=own_delta, clip=req.max_grad_norm, sigma=None,
                     min_sigma=policy.min_sigma, accountant=req.accountant, steps=train.local_steps,
                     batch_size=train.batch_size)
    epsilon = policy.epsilon_budget
    if req.epsilon_budget is not None:
        if not req.epsilon_budget <= policy.epsilon_budget:
            return _looser("privacy.epsilon_budget", f"{req.epsilon_budget:g}", f"at most {policy.epsilon_budget:g}",
                           "site.privacy.epsilon_budget",
                           f"the coordinator sets privacy.epsilon_budget <= {policy.epsilon_budget:g}, or null to use "
                           "each site's own budget")
        epsilon = req.epsilon_budget
    delta = own_delta
    if req.delta is not None:
        if not req.delta <= own_delta:
            return _looser("privacy.delta", f"{req.delta:g}", f"at most {own_delta:g}", "site.privacy.delta",
                           f"the coordinator sets privacy.delta <= {own_delta:g}, or null to use each site's own")
        delta = req.delta
    if req.max_grad_norm > policy.max_clip:
        return _looser("privacy.max_grad_norm", f"{req.max_grad_norm:g}", f"at most {policy.max_clip:g}",
                       "site.privacy.max_clip", f"the coordinator sets privacy.max_grad_norm <= {policy.max_clip:g}")
    if req.noise_multiplier is not None and not req.noise_multiplier >= policy.min_sigma:
        return _looser("privacy.noise_multiplier", f"{req.noise_multiplier:g}", f"at least {policy.min_sigma:g}",
                       "site.privacy.min_sigma",
                       f"the coordinator sets privacy.noise_multiplier >= {policy.min_sigma:g}, or null to let each "
                       "site calibrate it")
    if req.accountant not in policy.accountants:
        return _looser("privacy.accountant", repr(req.accountant), f"one of {', '.join(policy.accountants)}",
                       "site.privacy.accountants",
                       f"the coordinator sets privacy.accountant to one of {', '.join(policy.accountants)}")
    return Terms(private=True, epsilon_budget=float(epsilon), delta=float(delta), clip=float(req.max_grad_norm),
                 sigma=req.noise_multiplier, min_sigma=policy.min_sigma, accountant=req.accountant,
                 steps=train.local_steps, batch_size=train.batch_size)
