"""Where a site's DP randomness comes from: Poisson sampling and Gaussian noise.

DP-SGD is private only if nobody but the site can know its noise or which records each step
sampled. Two sources:

* :class:`SystemRandomness` (every deployed site): for each draw, a fresh 256-bit key and a
  128-bit counter block from the operating system's cryptographically secure generator
  (``os.urandom``, i.e. ``getrandom(2)``) key an AES-256-CTR keystream (``cryptography``; the
  construction of NIST SP 800-90A's CTR_DRBG, and of the kernel's own generator with ChaCha20 in
  place of AES; about 4x the throughput of ``os.urandom`` here, ``bench/bench_noise.py``). Its
  64-bit words become uniform doubles (53 bits) and, by the Box-Muller transform in float64, normal
  draws. Each noise value is the sum of four draws divided by two (same standard deviation), as
  Opacus' own ``secure_mode`` does against floating-point attacks on the Gaussian mechanism (Opacus
  cites arXiv 2107.10138 and 2112.05307). Opacus' secure mode itself needs ``torchcsprng``, which
  has no build for torch 2.13; this is the same construction with the OS-keyed generator in its
  place. No seed exists that anyone, the coordinator included, could know.
* :class:`SeededRandomness` (simulated sites with ``site.noise_seed``, tests only): torch
  generators from a known seed, so a run can be repeated bit for bit. Anyone who knows the seed
  can subtract the noise, so a deployed site refuses it (``SiteSettings.validate``).
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_PI = 2.0 * math.pi
_MASK53 = (1 << 53) - 1


def _random_words(n: int) -> torch.Tensor:
    """``n`` random 64-bit words: AES-256-CTR under a fresh key and counter block from ``os.urandom``."""
    size = 8 * n
    out = bytearray(size + 16)  # update_into needs room for a block
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    encryptor.update_into(bytes(size), out)
    return torch.frombuffer(out, dtype=torch.int64, count=n)


def _uniform_doubles(n: int) -> torch.Tensor:
    """``n`` uniform doubles in [0, 1) with 53 random bits each."""
    return (_random_words(n) & _MASK53).to(torch.float64).mul_(2.0**-53)


def _normal_doubles(n: int) -> torch.Tensor:
    """``n`` standard normal draws (Box-Muller, float64)."""
    pairs = (n + 1) // 2
    u = _uniform_doubles(2 * pairs)
    radius = torch.log1p(-u[:pairs]).mul_(-2.0).sqrt_()  # 1 - u is in (0, 1]: the log is finite
    angle = u[pairs:].mul_(_TWO_PI)
    out = torch.empty(2 * pairs, dtype=torch.float64)
    torch.mul(radius, torch.cos(angle), out=out[:pairs])
    torch.mul(radius, torch.sin(angle), out=out[pairs:])
    return out[:n]


class SystemRandomness:
    """Sampling and noise from the operating system's cryptographically secure generator."""

    name = "os-csprng"
    secure = True

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        """Which of ``n`` records a Poisson sample with rate ``q`` takes (bool, shape ``(n,)``)."""
        return _uniform_doubles(n) < q

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Noise N(0, std²) shaped and typed like ``reference``: (four draws summed) / 2."""
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        draws = _normal_doubles(4 * n).view(4, n).sum(dim=0).mul_(std / 2.0)
        return draws.to(dtype=reference.dtype, device=reference.device).view(reference.shape)


class SeededRandomness:
    """Reproducible sampling and noise from a known seed: simulated sites only (tests, benchmarks)."""

    name = "seeded"
    secure = False

    def __init__(self, seed: int) -> None:
        self.sample_gen = torch.Generator().manual_seed(seed)
        self.noise_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)

    def poisson_mask(self, n: int, q: float) -> torch.Tensor:
        """Which of ``n`` records a Poisson sample with rate ``q`` takes (seeded)."""
        return torch.rand(n, generator=self.sample_gen) < q

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        # exactly Opacus' non-secure path (``_generate_noise``), with our generator
        """Noise N(0, std²) shaped like ``reference``, exactly Opacus' non-secure draw (seeded)."""
        return torch.normal(mean=0, std=std, size=reference.shape, device=reference.device,
                            generator=self.noise_gen, dtype=reference.dtype)


Randomness = SystemRandomness | SeededRandomness
