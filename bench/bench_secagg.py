"""What secure aggregation costs a site and the coordinator: bytes and time per round.

    .venv/bin/python bench/bench_secagg.py [--sites 3,10] [--length 15232,1000000] [--repeats 3]
    .venv/bin/python bench/bench_secagg.py --federation [--seeds 0,1,2]

``--federation``: the demo federation (configs/simulation.yaml: 3 sites, 3 rounds, DP at eps = 3) with secure
aggregation off (the baseline: the dithered codec) and on, per noise seed, in the same run: uplink bytes per site
and round, round time (rounds 2-3, the model already loaded) and the final held-out loss, as ratios.

Without it:
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


def federation(seeds: list[int]) -> None:
    """Secure aggregation off vs on in the demo federation, per seed (see the module docstring)."""
    import json
    import tempfile
    from pathlib import Path

    from fedsecure.config import load_config
    from fedsecure.launch.simulate import simulate

    root = Path(__file__).resolve().parents[1]
    res: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for seed in seeds:
        for on in (False, True):
            cfg = load_config(root / "configs" / "simulation.yaml", {"site.noise_seed": seed,
                                                                     "federation.secure_aggregation.enabled": on})
            with tempfile.TemporaryDirectory() as tmp:
                summary = simulate(cfg, run_dir=Path(tmp) / "run", announce=lambda *_: None)
                rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            up = statistics.mean(m["bytes_up"] for m in rows if m["site"] != "federation" and m["round"] >= 1
                                 and "bytes_up" in m)
            secs = statistics.median(m["seconds"] for m in rows if m["site"] == "federation" and m["round"] >= 2)
            res[on].append((up, secs, summary["final_eval_loss"]))
            print(f"  seed {seed}, secure aggregation {'on' if on else 'off'}: {up:,.0f} B up per site-round, "
                  f"{secs:.2f} s per round, final loss {summary['final_eval_loss']:.4f}", flush=True)
    off, on = ({k: statistics.mean(x[i] for x in v) for i, k in enumerate(("up", "s", "loss"))}
               for v in (res[False], res[True]))
    print(f"# bench_secagg --federation: demo (3 sites, 3 rounds, DP eps = 3), noise seeds {seeds}, means")
    print("| | uplink B per site-round | round time | final held-out loss |")
    print("|---|---|---|---|")
    print(f"| dithered codec (off, baseline) | {off['up']:,.0f} | {off['s']:.2f} s | {off['loss']:.4f} |")
    print(f"| secure aggregation on | {on['up']:,.0f} | {on['s']:.2f} s | {on['loss']:.4f} |")
    print(f"| ratio on / off | {on['up'] / off['up']:.2f} | {on['s'] / off['s']:.2f} | "
          f"{100 * (on['loss'] / off['loss'] - 1):+.2f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--federation", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sites", default="3,10")
    ap.add_argument("--length", default="15232,1000000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.federation:
        federation([int(x) for x in args.seeds.split(",")])
        return
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
