"""Client-level DP with the noise added at the sites (distributed discrete Gaussian) vs central noise, same ε.

    .venv/bin/python bench/bench_ddg.py [--seeds 0,1,2] [--sigma 0.02] [--clip 4] [--no-federation]

1. **Noise at the same ε** (exact, from the accounting): for each target ε (δ = 1e-5), rounds and number of
   sites, the central mechanism's σ (Opacus PRV, every site every round) and the smallest distributed σ_c whose
   ε (zCDP, the larger of dp-accounting's and Opacus' conversion, the sites' shares sized for the secure
   aggregation threshold, all sites in the sum) is at most the target; printed as the ratio of the noise's
   standard deviation on the mean, rounding included (each site's rounding adds at most γ²/4 a value).
2. **A site's encoding time**: clip, conditional rounding and OpenDP's exact sampler against the plain
   secure-aggregation grid (:func:`fedsecure.secagg.quantize.quantize`, the baseline) on the same vector.
3. **The demo federation** (configs/simulation.yaml: 3 sites, 3 rounds, record-level DP at ε = 3) with
   client-level DP central (the baseline: secure aggregation off, noise at the coordinator) and distributed
   (secure aggregation on, noise at the sites) at the same client-level ε, per noise seed in the same run:
   final held-out loss, uplink bytes per site-round and round time (rounds 2-3), as ratios. Three sites cannot
   buy a meaningful client-level ε (the noise on the mean is σ_c S √d / 3 against a signal of at most S), so
   ``--sigma`` is small and the figure is the mechanism's overhead, not a recommended setting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from fedsecure.privacy import distributed
from fedsecure.privacy.accounting import Spend, calibrate_noise, epsilon_of
from fedsecure.secagg import ddg

DELTA = 1e-5
DEMO_DIM = 15_232


def distributed_epsilon(sigma_c: float, rounds: int, sites: int, threshold: int, dim: int) -> float:
    p = ddg.plan(1.0, sigma_c, dim, threshold)
    rhos = [p.rho(sites)] * rounds
    return max(distributed.epsilon(rhos, DELTA), distributed.independent_epsilon(rhos, DELTA))


def distributed_sigma(target: float, rounds: int, sites: int, threshold: int, dim: int) -> float:
    lo, hi = 0.01, 200.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if distributed_epsilon(mid, rounds, sites, threshold, dim) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def noise_std(sigma_c: float, sites: int, threshold: int, dim: int) -> float:
    """Std of the noise on the sum (update units, clip 1): the sites' discrete Gaussians and their rounding."""
    p = ddg.plan(1.0, sigma_c, dim, threshold)
    return math.sqrt(sites * (p.sigma**2 + 0.25)) * p.gamma


def same_epsilon_table() -> None:
    print("# bench_ddg: noise on the mean at the same client-level ε (δ = 1e-5), distributed / central")
    print("| target ε | rounds | sites (threshold) | values | central σ (PRV) | distributed σ_c | noise std "
          "distributed / central |")
    print("|---|---|---|---|---|---|---|")
    for eps in (1.0, 3.0, 8.0):
        for rounds in (3, 50):
            for sites, threshold, dim in ((3, 2, DEMO_DIM), (100, 67, 1_000_000)):
                central = calibrate_noise(epsilon_budget=eps, delta=DELTA, spent=[], q=1.0, steps=rounds,
                                          tolerance=0.001)
                assert central is not None
                sig = distributed_sigma(eps, rounds, sites, threshold, dim)
                ratio = noise_std(sig, sites, threshold, dim) / central
                print(f"| {eps:g} | {rounds} | {sites} ({threshold}) | {dim:,} | {central:.3f} | {sig:.3f} | "
                      f"{ratio:.3f} |", flush=True)


def encode_time(lengths: list[int], repeats: int) -> None:
    import time

    import numpy as np

    from fedsecure.secagg.quantize import quantize

    print("# bench_ddg: a site's encoding, distributed noise vs the plain secure-aggregation grid (medians)")
    print("| values | plain grid (baseline) | clip + round + discrete Gaussian | of which the sampler | ratio | "
          "values a second |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        x = {"w": np.random.default_rng(0).normal(size=n) * 0.01}
        p = ddg.plan(1.0, 1.0, n, 2)
        t_plain, t_ddg, t_noise = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            quantize(x, {"w": 0.01}, 4, 7, 1)
            t1 = time.perf_counter()
            ddg.encode(x, p)
            t2 = time.perf_counter()
            ddg.discrete_gaussian(p.sigma, n)
            t3 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_ddg.append(t2 - t1)
            t_noise.append(t3 - t2)
        a, b, c = (statistics.median(t) for t in (t_plain, t_ddg, t_noise))
        print(f"| {n:,} | {1000 * a:.1f} ms | {1000 * b:.0f} ms | {1000 * c:.0f} ms | {b / a:.0f} | {n / b:,.0f} |",
              flush=True)


def federation(seeds: list[int], sigma: float, clip: float) -> None:
    from fedsecure.config import load_config
    from fedsecure.launch.simulate import simulate

    root = Path(__file__).resolve().parents[1]
    rounds = 3
    eps = epsilon_of([Spend(sigma, 1.0, rounds)], DELTA, "prv")
    sig_d = distributed_sigma(eps, rounds, 3, 2, DEMO_DIM)
    print(f"  central σ_c = {sigma} gives ε = {eps:.1f}; distributed σ_c = {sig_d:.4f} gives "
          f"{distributed_epsilon(sig_d, rounds, 3, 2, DEMO_DIM):.1f}", flush=True)
    res: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
    for seed in seeds:
        for on in (False, True):
            cfg = load_config(root / "configs" / "simulation.yaml", {
                "site.noise_seed": seed, "federation.secure_aggregation.enabled": on,
                "privacy.client_dp.enabled": True, "privacy.client_dp.clip": clip,
                "privacy.client_dp.noise_multiplier": sig_d if on else sigma, "privacy.client_dp.noise_seed": seed})
            with tempfile.TemporaryDirectory() as tmp:
                summary = simulate(cfg, run_dir=Path(tmp) / "run", announce=lambda *_: None)
                rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            up = statistics.mean(m["bytes_up"] for m in rows if m["site"] != "federation" and m["round"] >= 1
                                 and "bytes_up" in m)
            secs = statistics.median(m["seconds"] for m in rows if m["site"] == "federation" and m["round"] >= 2)
            cl = summary["privacy"]["client_level"]
            res[on].append((summary["final_eval_loss"], cl["epsilon"], up, secs))
            print(f"  seed {seed}, {'distributed' if on else 'central'}: final loss {summary['final_eval_loss']:.4f}, "
                  f"client-level ε {cl['epsilon']:.2f}, {up:,.0f} B up per site-round, {secs:.2f} s per round",
                  flush=True)
    c, d = ({k: statistics.mean(x[i] for x in v) for i, k in enumerate(("loss", "eps", "up", "s"))}
            for v in (res[False], res[True]))
    print(f"# bench_ddg --federation: demo (3 sites, 3 rounds), clip {clip}, seeds {seeds}, means")
    print("| client-level noise | ε (δ = 1e-5) | final held-out loss | uplink B per site-round | round time |")
    print("|---|---|---|---|---|")
    print(f"| central, σ_c = {sigma} (baseline) | {c['eps']:.2f} | {c['loss']:.4f} | {c['up']:,.0f} | {c['s']:.2f} s |")
    print(f"| distributed, σ_c = {sig_d:.4f} | {d['eps']:.2f} | {d['loss']:.4f} | {d['up']:,.0f} | {d['s']:.2f} s |")
    print(f"| ratio distributed / central | {d['eps'] / c['eps']:.3f} | {100 * (d['loss'] / c['loss'] - 1):+.2f}% | "
          f"{d['up'] / c['up']:.2f} | {d['s'] / c['s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sigma", type=float, default=0.02)
    ap.add_argument("--clip", type=float, default=4.0)
    ap.add_argument("--no-federation", action="store_true")
    args = ap.parse_args()
    same_epsilon_table()
    encode_time([15_232, 262_144], 3)
    if not args.no_federation:
        federation([int(x) for x in args.seeds.split(",")], args.sigma, args.clip)


if __name__ == "__main__":
    main()
