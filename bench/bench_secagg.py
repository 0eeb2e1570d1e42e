"""What secure aggregation costs a site and the coordinator: bytes and time per round, protocol alone.

    .venv/bin/python bench/bench_secagg.py [--sites 3,10] [--length 15232,1000000] [--repeats 3]

For each consortium size and vector length (15,232 = the demo adapter's values), runs the five phases of
fedsecure.secagg in one process with every site answering, and prints per site: the bytes it sends in each
phase (and all together) against the same vector sent as int64 (what Flower 1.42's SecAgg+ uploads), and the
time of its phases and of the coordinator's, as ratios to the baseline measured in the same run: one AES-CTR
mask over the vector (the least any masking scheme must do). The modulus is sized for codes |q| <= 7 weighted
by 384 records per site (the demo).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecure.secagg import masking
from fedsecure.secagg.coordinator import Aggregation
from fedsecure.secagg.protocol import RoundSpec
from fedsecure.secagg.site import SiteSecAgg


def one_round(n: int, length: int, bits: int) -> dict[str, float]:
    """Bytes a site sends per phase (site 1's), and seconds of all sites' work and of the coordinator's."""
    keys = {i: Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    roster = {i: k.public_key() for i, k in keys.items()}
    spec = RoundSpec("bench", 1, tuple(keys), n // 2 + 1, length, bits)
    sites = {i: SiteSecAgg(i, spec, keys[i], roster) for i in keys}
    agg = Aggregation(spec, roster)
    rng = np.random.default_rng(0)
    xs = {i: rng.integers(-7 * 384, 7 * 384 + 1, length) for i in keys}
    t_site = t_coord = 0.0
    out: dict[str, float] = {}

    def site_phase(name: str, fn):  # noqa: ANN001, ANN202
        nonlocal t_site
        t0 = time.perf_counter()
        res = {i: fn(i) for i in sites}
        t_site += time.perf_counter() - t0
        first = res[1]
        out[name] = float(sum(len(v) for v in first.values()) if isinstance(first, dict) else len(first))
        return res

    def coord(fn, arg):  # noqa: ANN001, ANN202
        nonlocal t_coord
        t0 = time.perf_counter()
        res = fn(arg)
        t_coord += time.perf_counter() - t0
        return res

    adverts = coord(agg.adverts, site_phase("advertise", lambda i: sites[i].advertise()))
    routed = coord(agg.route, site_phase("shares", lambda i: sites[i].share(adverts)))
    u3 = coord(agg.masked, site_phase("masked vector", lambda i: sites[i].masked_input(routed[i], xs[i])))
    sigs = coord(agg.signatures, site_phase("consistency", lambda i: sites[i].consistency(u3)))
    total = coord(agg.unmask, site_phase("unmask", lambda i: sites[i].unmask(sigs)))
    assert np.array_equal(total, sum(xs.values()))
    out["site_seconds"], out["coord_seconds"] = t_site / n, t_coord
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="3,10")
    ap.add_argument("--length", default="15232,1000000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("# bench_secagg: the five phases in one process, every site answering; per site (site 1's bytes)")
    print("| sites | values | modulus bits | bytes sent by a site (all phases) | of which masked vector | "
          "as int64 | x fewer than int64 | site time | coordinator time | one AES-CTR mask (baseline) | "
          "site / baseline | coordinator / baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",")):
        for length in (int(x) for x in args.length.split(",")):
            bits = masking.modulus_bits(7, 384 * n)
            runs = [one_round(n, length, bits) for _ in range(args.repeats)]
            base = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                masking.prg(b"\1" * 32, length, bits)
                base.append(time.perf_counter() - t0)
            r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            b = statistics.median(base)
            sent = sum(v for k, v in r.items() if not k.endswith("seconds"))
            print(f"| {n} | {length:,} | {bits} | {sent:,.0f} | {r['masked vector']:,.0f} | {8 * length:,} | "
                  f"{8 * length / sent:.2f} | {1000 * r['site_seconds']:.1f} ms | {1000 * r['coord_seconds']:.1f} ms | "
                  f"{1000 * b:.2f} ms | {r['site_seconds'] / b:.1f} | {r['coord_seconds'] / b:.1f} |", flush=True)


if __name__ == "__main__":
    main()
