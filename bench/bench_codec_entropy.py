"""Bits per value of the dithered codes against the Gaussian rate-distortion bound, on real site updates.

    .venv/bin/python bench/bench_codec_entropy.py [--rounds 2] [--repeats 5]

Runs the demo federation (configs/simulation.yaml: the shipped base, 3 sites, DP at eps = 3, noise seed 0) and
keeps every update a site encodes. For each, with the default policy (B step 1.0 x RMS, A step 3.0):

- per tensor group, the bits a value costs: range-coded given the dither (encoding 4, format 3: what is sent),
  and packed then zstd (encoding 3, the baseline, in the same run); against the Gaussian rate-distortion bound at
  the distortion reached, R(D) = 1/2 log2(var / D), and the bound for unbiased reconstruction (what dither
  gives), 1/2 log2(1 + var / D);
- the whole payload, both ways (bytes, and the ratio), and the encode + decode time of each (median of repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

import fedsecure.federation.site as site_module
from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate
from fedsecure.transport import stages
from fedsecure.transport.codec import decode, expected_manifest
from fedsecure.transport.entropy import DitheredRanged
from fedsecure.transport.session import site_encode, uplink_policy
from fedsecure.transport.stages import Dithered, Randomness, dither_stream

ROOT = Path(__file__).resolve().parents[1]


def capture(rounds: int) -> tuple[list[dict[str, np.ndarray]], object]:
    """Every delta the sites encode in the demo federation, and its transport settings."""
    deltas, settings = [], []

    def spy(delta, residual, ts, seed=None):  # noqa: ANN001, ANN202
        deltas.append({k: np.array(v) for k, v in delta.items()})
        settings.append(ts)
        return site_encode(delta, residual, ts, seed)

    site_module.site_encode = spy
    cfg = load_config(ROOT / "configs" / "simulation.yaml", {"site.noise_seed": 0, "federation.rounds": rounds})
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, run_dir=Path(tmp) / "run", announce=lambda *_: None)
    site_module.site_encode = site_encode
    return deltas, settings[0]


@contextlib.contextmanager
def packed_only():
    """Dithered rules send encoding 3 (packed codes, zstd) instead of 4: the baseline."""
    saved = stages.BY_NAME["dq"]
    stages.BY_NAME["dq"] = stages.STAGES[3]
    try:
        yield
    finally:
        stages.BY_NAME["dq"] = saved


def per_group(deltas: list[dict[str, np.ndarray]], policy) -> dict[str, np.ndarray]:  # noqa: ANN001
    """group -> [values, bits range-coded, bits packed+zstd, n x R(D), n x unbiased bound]."""
    out: dict[str, np.ndarray] = {}
    for i, d in enumerate(deltas):
        u_all, pos = dither_stream(1000 + i, sum(v.size for v in d.values())), 0
        for name in sorted(d):
            x = d[name].reshape(-1).astype(np.float32)
            rule = policy.rule(name)
            u = u_all[pos: pos + x.size]
            pos += x.size
            ranged, rec = DitheredRanged().encode(x, rule, Randomness(None, u))
            packed, _ = Dithered().encode(x, rule, Randomness(None, u))
            dist = float(np.mean((rec.astype(np.float64) - x) ** 2))
            var = float(np.mean(x.astype(np.float64) ** 2))
            z = 5 + len(zstandard.ZstdCompressor(level=3).compress(packed[1]))
            row = [x.size, 8 * len(b"".join(ranged)), 8 * z, x.size * max(0.0, 0.5 * math.log2(var / dist)),
                   x.size * 0.5 * math.log2(1 + var / dist)]
            group = f"{'lora_A' if 'lora_A' in name else 'lora_B'} (step {rule.dither:g} x RMS)"
            out[group] = out.get(group, np.zeros(5)) + np.array(row)
    return out


def payloads(deltas, ts, repeats: int) -> dict[str, tuple[float, float]]:  # noqa: ANN001
    """format -> (mean payload bytes, median encode + decode seconds over all updates)."""
    res = {}
    ways = (("packed + zstd (encoding 3, baseline)", packed_only),
            ("range-coded given the dither (encoding 4, sent)", contextlib.nullcontext))
    for label, ctx in ways:
        with ctx():
            sizes, times = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sizes = []
                for i, d in enumerate(deltas):
                    payload, _ = site_encode(d, None, ts, 1000 + i)
                    decode(payload, expected_manifest({k: v.shape for k, v in d.items()}), max_bytes=1 << 26)
                    sizes.append(len(payload))
                times.append(time.perf_counter() - t0)
        res[label] = (statistics.mean(sizes), statistics.median(times))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    deltas, ts = capture(args.rounds)
    n = sum(v.size for v in deltas[0].values())
    print(f"# bench_codec_entropy: {len(deltas)} site updates of {n:,} values (demo federation, {args.rounds} "
          "rounds, DP eps = 3, noise seed 0), default policy")
    print("| tensors | values | range-coded given the dither | packed + zstd | Gaussian R(D) | gap | "
          "unbiased bound 1/2 log2(1 + var/D) | gap |")
    print("|---|---|---|---|---|---|---|---|")
    tot = np.zeros(5)
    for group, row in sorted(per_group(deltas, uplink_policy(ts)).items()):
        tot += row
        v, b, z, rd, ub = row / row[0]
        print(f"| {group} | {int(row[0]):,} | {b:.3f} bit | {z:.3f} bit | {rd:.3f} | {b - rd:+.3f} | {ub:.3f} | "
              f"{b - ub:+.3f} |")
    v, b, z, rd, ub = tot / tot[0]
    print(f"| all | {int(tot[0]):,} | {b:.3f} bit | {z:.3f} bit | {rd:.3f} | {b - rd:+.3f} | {ub:.3f} | "
          f"{b - ub:+.3f} |")
    res = payloads(deltas, ts, args.repeats)
    (base_b, base_t), (new_b, new_t) = res.values()
    for label, (size, secs) in res.items():
        print(f"{label}: {size:,.0f} B per update, {4 * n / size:.1f}x fewer than fp32; encode + decode of "
              f"{len(deltas)} updates {1000 * secs:.1f} ms")
    print(f"ratio sent / baseline: bytes {new_b / base_b:.3f}, time {new_t / base_t:.2f}")


if __name__ == "__main__":
    main()
