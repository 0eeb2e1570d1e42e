"""The distributed discrete Gaussian's integers: what a site sends into the sum, and what the coordinator makes of it.

Client-level DP under secure aggregation (:mod:`fedsecure.privacy.distributed` has the mechanism and its
accounting): the coordinator announces one :class:`DDGRound` with the round, each site checks it and turns its
update into :func:`encode`'s integers (clip, scale, conditional rounding, its share of the noise), the
protocol sums them, and :func:`decode` divides the sum by the sites asked. No weights by record count: they
would make one site's influence depend on its data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedsecure.errors import SecAggError
from fedsecure.privacy.distributed import MIN_SIGMA, granularity, rho, rounded_l2
from fedsecure.secagg.masking import modulus_bits

#: Standard deviations of one site's noise the modulus holds (a wrap has probability below 1e-30 a value).
TAIL = 12.0
#: Rounding tries before a site gives up (each fails with probability at most β = 0.61).
MAX_TRIES = 200
#: Values a sampler thread draws at a time.
CHUNK = 1 << 16


@dataclass(frozen=True)
class DDGRound:
    """One round's public parameters, which every site is told and checks (``sigma`` in units of ``gamma``)."""

    clip: float
    gamma: float
    sigma: float
    dim: int

    @property
    def l2(self) -> float:
        """Δ₂: the L2 sensitivity of one site's rounded vector, in units of ``gamma``."""
        return rounded_l2(self.clip / self.gamma, self.dim)

    def bits(self, sites: int) -> int:
        """Bits of a modulus that holds the sum of ``sites`` vectors without wrapping (noise tails included)."""
        return modulus_bits(math.ceil(self.l2 + TAIL * self.sigma), sites)

    def rho(self, sites: int) -> float:
        """The zCDP ρ of a released sum of ``sites`` sites' vectors."""
        return rho(self.l2, self.sigma, self.dim, sites)

    def to_dict(self) -> dict[str, Any]:
        """The announcement's ``ddg`` field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> DDGRound:
        """Parse and check an announcement's ``ddg`` field; raises SecAggError naming what is wrong."""
        if not isinstance(doc, Mapping) or set(doc) != {"clip", "gamma", "sigma", "dim"}:
            raise SecAggError(f"the round's distributed-noise parameters are malformed: {doc!r:.120}")
        try:
            out = cls(float(doc["clip"]), float(doc["gamma"]), float(doc["sigma"]), int(doc["dim"]))
        except (TypeError, ValueError):
            raise SecAggError(f"the round's distributed-noise parameters are not numbers: {doc!r:.120}") from None
        for name in ("clip", "gamma", "sigma"):
            value = getattr(out, name)
            if not (math.isfinite(value) and value > 0):
                raise SecAggError(f"the round's distributed-noise {name} is {value}; it must be a finite number > 0")
        if out.sigma < MIN_SIGMA:
            raise SecAggError(f"the round's distributed noise σ = {out.sigma} grid steps is below {MIN_SIGMA}, where "
                              "its accounting does not hold; refused")
        if out.dim < 1:
            raise SecAggError(f"the round's distributed-noise dimension is {out.dim}")
        return out


def plan(clip: float, noise_multiplier: float, dim: int, threshold: int) -> DDGRound:
    """The round's parameters: ``γ`` from :func:`~fedsecure.privacy.distributed.granularity`, and each site's ``σ``
    so that the noise of any ``threshold`` sites together has the central mechanism's variance ``(σ_c Δ₂)²``.
    """
    gamma = granularity(clip, dim)
    l2 = rounded_l2(clip / gamma, dim)
    return DDGRound(clip, gamma, max(noise_multiplier * l2 / math.sqrt(threshold), MIN_SIGMA), dim)


def encode(delta: Mapping[str, np.ndarray], params: DDGRound, rng: np.random.Generator | None = None) -> np.ndarray:
    """A site's integer vector: clip to ``S``, scale by ``1/γ``, round conditionally, add ``N_Z(0, σ²)`` (int64).

    ``rng`` drives only the rounding (the analysis holds for any rounding inside ``Δ₂``, so it need not be
    secret); the noise always comes from OpenDP's exact sampler and the operating system's generator.
    """
    names = sorted(delta)
    x = np.concatenate([np.asarray(delta[k], np.float64).reshape(-1) for k in names]) if names else np.zeros(0)
    if x.size != params.dim:
        raise SecAggError(f"the update holds {x.size} values, the round's distributed noise is sized for "
                          f"{params.dim}")
    if not np.all(np.isfinite(x)):
        raise SecAggError("the update holds a value that is not finite; nothing is sent")
    norm = float(np.linalg.norm(x))
    if norm > params.clip:
        x = x * (params.clip / norm)
    y = x / params.gamma
    low = np.floor(y)
    frac = y - low
    rng = rng if rng is not None else np.random.default_rng()
    bound = params.l2
    for _ in range(MAX_TRIES):
        z = low + (rng.random(y.size) < frac)
        if float(np.linalg.norm(z)) <= bound:
            break
    else:
        raise SecAggError(f"conditional rounding exceeded its bound {MAX_TRIES} times (probability below 1e-40 for "
                          "an honest update); nothing is sent")
    return z.astype(np.int64) + discrete_gaussian(params.sigma, z.size)


def discrete_gaussian(sigma: float, size: int) -> np.ndarray:
    """``size`` independent draws of ``N_Z(0, sigma²)`` from OpenDP's exact sampler (int64).

    About 16 µs a value on one core (rational arithmetic); OpenDP's library call releases the GIL, so chunks of
    :data:`CHUNK` values are drawn on a thread per available core.
    """
    import opendp.prelude as dp

    dp.enable_features("contrib")

    def draw(n: int) -> np.ndarray:
        meas = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64"), size=n), dp.l2_distance(T="i64"),
                                  scale=float(sigma))
        return np.asarray(meas([0] * n), dtype=np.int64)

    sizes = [min(CHUNK, size - i) for i in range(0, size, CHUNK)]
    if len(sizes) <= 1:
        return draw(size) if size else np.zeros(0, np.int64)
    workers = min(len(sizes), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.concatenate(list(pool.map(draw, sizes)))


def decode(total: np.ndarray, params: DDGRound, denominator: int,
           shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The noised mean ``Σ z_i γ / denominator`` (a fixed denominator: the sites asked this round), as tensors."""
    if total.size != params.dim:
        raise SecAggError(f"the sum holds {total.size} values, the round {params.dim}")
    flat = total.astype(np.float64) * (params.gamma / max(int(denominator), 1))
    out, pos = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64))
        out[name] = flat[pos: pos + size].astype(np.float32).reshape(shapes[name])
        pos += size
    if pos != params.dim:
        raise SecAggError(f"the adapter holds {pos} values, the round {params.dim}")
    return out
