"""Integers for secure aggregation: every site quantizes onto the same public grid, the sum is exact.

Each tensor has one step for all sites, ``bound / levels`` (``bound``: the most an honest site's update
can move a value, :func:`fedsecure.federation.intake.adam_bound`; the coordinator sends the steps with
the round). A site clips to ``+-bound`` (an honest update never reaches it; the clip is a guard),
quantizes with subtractive dither, ``q = round(x / step + u)`` with ``u`` from its own seed
(:func:`fedsecure.transport.stages.dither_stream`), so ``|q| <= levels + 1``, and sends ``w q`` where
``w`` is its FedAvg weight in units of the round's common divisor (records / gcd). The coordinator gets
``S = sum w_i q_i`` exactly (the modulus is sized so it cannot wrap, :func:`round_bits`), and the seeds
of the sites in the sum, so the FedAvg mean is ``(S - sum w_i u_i) x step / sum w_i``: unbiased, each
value's error uniform on half a step, the same as the dithered codec's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedsecure.errors import SecAggError
from fedsecure.secagg.masking import modulus_bits
from fedsecure.transport.stages import dither_stream


def unit_weights(records: Mapping[str, int]) -> dict[str, int]:
    """FedAvg weights as small integers: each site's records divided by their greatest common divisor."""
    g = math.gcd(*records.values()) if records else 1
    return {k: v // g for k, v in records.items()}


def round_bits(levels: int, weights: Sequence[int]) -> int:
    """Bits of the round's modulus: holds ``sum w_i q_i`` for any codes ``|q| <= levels + 1``."""
    return modulus_bits(levels + 1, sum(weights))


def layout(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, size) in the order the round's vector concatenates them (sorted names)."""
    return [(k, tuple(shapes[k]), int(np.prod(shapes[k], dtype=np.int64))) for k in sorted(shapes)]


def quantize(delta: Mapping[str, np.ndarray], steps: Mapping[str, float], levels: int, seed: int,
             weight: int) -> np.ndarray:
    """The site's integer vector ``w x round(x / step + u)`` (int64), tensors in sorted order."""
    parts = []
    names = sorted(delta)
    if set(names) != set(steps):
        raise SecAggError(f"the round's steps name {sorted(steps)}, the update holds {names}")
    u = dither_stream(seed, sum(int(np.size(delta[k])) for k in names)).astype(np.float64)
    pos = 0
    for k in names:
        step = float(steps[k])
        if not (math.isfinite(step) and step > 0):
            raise SecAggError(f"the round's step for {k} is {step}; it must be a finite number > 0")
        x = np.asarray(delta[k], np.float64).reshape(-1)
        x = np.clip(x, -levels * step, levels * step)
        q = np.rint(x / step + u[pos: pos + x.size])
        pos += x.size
        parts.append(q.astype(np.int64))
    return int(weight) * np.concatenate(parts) if parts else np.zeros(0, np.int64)


def mean(total: np.ndarray, seeds: Mapping[str, int], weights: Mapping[str, int], steps: Mapping[str, float],
         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The FedAvg mean of the sites whose ``seeds`` are given, from their integer sum ``total``."""
    if set(seeds) != set(weights) or not seeds:
        raise SecAggError(f"seeds of {sorted(seeds)} and weights of {sorted(weights)} must name the same sites")
    n = int(total.size)
    dither = np.zeros(n, np.float64)
    for site, seed in seeds.items():
        dither += weights[site] * dither_stream(seed, n).astype(np.float64)
    w = float(sum(weights.values()))
    out, pos = {}, 0
    for name, shape, size in layout(shapes):
        v = (total[pos: pos + size].astype(np.float64) - dither[pos: pos + size]) * float(steps[name]) / w
        out[name] = v.astype(np.float32).reshape(shape)
        pos += size
    if pos != n:
        raise SecAggError(f"the sum holds {n} values, the adapter {pos}")
    return out
