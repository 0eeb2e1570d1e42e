"""Where a site's DP randomness comes from: Poisson sampling and Gaussian noise.

DP-SGD is private only if nobody but the site can know its noise or which records each step
sampled. Two sources:

* :class:`SystemRandomness` (every deployed site): bytes from the operating system's
  cryptographically secure generator (``os.urandom``, i.e. ``getrandom(2)``), turned into uniform
  doubles (53 bits) and, by the Box-Muller transform in float64, into normal draws. Each noise
  value is the sum of four draws divided by two (same standard deviation), as Opacus' own
  ``secure_mode`` does against floating-point attacks on the Gaussian mechanism (Opacus cites
  arXiv 2107.10138 and 2112.05307). Opacus' secure mode itself needs ``torchcsprng``, which has no
  build for torch 2.13; this is the same construction with the OS generator in its place. No
  seed exists that anyone, the coordinator included, could know.
* :class:`SeededRandomness` (simulated sites with ``site.noise_seed``, tests only): torch
  generators from a known seed, so a run can be repeated bit for bit. Anyone who knows the seed
  can subtract the noise, so a deployed site refuses it (``SiteSettings.validate``).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_TWO_PI = 2.0 * math.pi
_2_POW_M53 = 1.0 / float(1 << 53)


def _uniform_doubles(n: int) -> np.ndarray:
    """``n`` uniform doubles in [0, 1) with 53 random bits each, from the OS's secure generator."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * _2_POW_M53


def _normal_doubles(n: int) -> np.ndarray:
    """``n`` standard normal draws (Box-Muller on OS-random uniforms, float64)."""
    pairs = (n + 1) // 2
    u = _uniform_doubles(2 * pairs)
    radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u is in (0, 1]: log is finite
    angle = _TWO_PI * u[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


class SystemRandomness:
    """Sampling and noise from the operating system's cryptographically secure generator."""

    name = "os-csprng"
    secure = True

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        """Which of ``n`` records a Poisson sample with rate ``q`` takes (bool, shape ``(n,)``)."""
        return torch.from_numpy(_uniform_doubles(n) < q)

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Noise N(0, std²) shaped and typed like ``reference``: (four draws summed) / 2."""
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        draws = _normal_doubles(4 * n).reshape(4, n).sum(axis=0) / 2.0
        return torch.from_numpy(draws * std).to(dtype=reference.dtype, device=reference.device).view(reference.shape)


class SeededRandomness:
    """Reproducible sampling and noise from a known seed: simulated sites only (tests, benchmarks)."""

    name = "seeded"
    secure = False

    def __init__(self, seed: int) -> None:
        self.sample_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        return torch.rand(n, generator=self.sample_gen) < q

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        # exactly Opacus' non-secure path (``_generate_noise``), with our generator
        return torch.normal(mean=0, std=std, size=reference.shape, device=reference.device,
                            generator=self.noise_gen, dtype=reference.dtype)


Randomness = SystemRandomness | SeededRandomness
