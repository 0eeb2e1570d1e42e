"""Transport: bytes per round vs fp32, final loss with the codec off and on, codec throughput.

    .venv/bin/python bench/bench_transport.py [--seeds 0,1,2] [--rounds 3] [--mib 64]

1. The same seeded demo simulation (configs/simulation.yaml, DP on) with the codec off and in
   each setting below, for every DP noise seed: uplink and downlink bytes per site per round as a
   ratio to what the codec-off run sends (fp32 arrays), and the final held-out loss of each,
   compared with the codec-off run of the same seed (paired: same data, same DP noise).
2. Encode + decode throughput in MB/s of fp32 input, on a ``--mib`` MiB synthetic adapter.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsecure.config import TransportSettings, load_config
from fedsecure.launch.simulate import simulate
from fedsecure.transport.codec import decode, encode, expected_manifest
from fedsecure.transport.session import uplink_policy

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "off (fp32 arrays)": {"transport.enabled": False},
    "dense int4": {"transport.uplink_dither": 0.0, "transport.policy": []},
    "dithered B 1, A 3 (default)": {},
    "dithered B 2, A 6 (slow link)": {"transport.uplink_dither": 2.0, "transport.policy": ["*lora_A*=d6/1.0"]},
    "dithered both ways (down 1.0)": {"transport.downlink_dither": 1.0},
    "top-5% int4 + EF": {"transport.uplink_dither": 0.0, "transport.policy": [], "transport.uplink_topk": 0.05},
}


def run(overrides: dict, noise_seed: int, rounds: int) -> tuple[dict, list[dict]]:
    cfg = load_config(ROOT / "configs" / "simulation.yaml",
                      {"site.noise_seed": noise_seed, "federation.rounds": rounds, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(cfg, run_dir=Path(tmp) / "run")
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def throughput(mib: int, label: str, ts: TransportSettings) -> str:
    rng = np.random.default_rng(0)
    n = mib * (1 << 20) // 4 // 64
    tensors = {f"layers.{i}.lora_{'AB'[i % 2]}.weight": rng.standard_normal((64, n // 64), np.float32)
               for i in range(64)}
    size = sum(v.nbytes for v in tensors.values())
    policy = uplink_policy(ts)
    expected = expected_manifest({k: v.shape for k, v in tensors.items()})
    enc, dec = [], []
    for rep in range(3):  # medians of 3
        t0 = time.perf_counter()
        payload, _ = encode(tensors, policy, seed=rep)
        t1 = time.perf_counter()
        decode(payload, expected, max_bytes=1 << 40)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    te, td = float(np.median(enc)), float(np.median(dec))
    mb = size / 1e6
    return (f"{label:>24}: encode {mb / te:.0f} MB/s, decode {mb / td:.0f} MB/s, "
            f"encode+decode {mb / (te + td):.0f} MB/s; {size / len(payload):.1f}x fewer bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2", help="DP noise seeds; every setting runs with each")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", action="append", default=None,
                    help="a setting's label (repeatable; labels contain commas); the off run always runs")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = dict(SETTINGS)
    if args.only:
        keep = set(args.only)
        settings = {k: v for i, (k, v) in enumerate(SETTINGS.items()) if i == 0 or k in keep}
    rows = {}
    for label, overrides in settings.items():
        losses, ups, downs, fp32s = [], [], [], []
        for seed in seeds:
            summary, metrics = run(overrides, seed, args.rounds)
            sites = [m for m in metrics if m["site"] != "federation" and m["round"] >= 1 and "bytes_up" in m]
            losses.append(summary["final_eval_loss"])
            ups.append(sum(m["bytes_up"] for m in sites) / len(sites))
            downs.append(sum(m["bytes_down"] for m in sites) / len(sites))
            fp32s.append(sites[0]["fp32_bytes"])
        rows[label] = (losses, float(np.mean(ups)), float(np.mean(downs)), fp32s[0])
        print(f"  {label}: losses {[round(x, 4) for x in losses]}", flush=True)
    off_losses, off_up, off_down, fp32 = rows[next(iter(rows))]
    print(f"# bench_transport: configs/simulation.yaml (3 sites, {args.rounds} rounds, DP eps=3), noise seeds {seeds}")
    print("| codec | final loss, mean | vs off, mean (per seed) | uplink B/site/round | x fewer | "
          "downlink B/site/round | x fewer |")
    print("|---|---|---|---|---|---|---|")
    for label, (losses, up, down, _) in rows.items():
        diffs = [100 * (a - b) / b for a, b in zip(losses, off_losses, strict=True)]
        per = ", ".join(f"{d:+.2f}" for d in diffs)
        print(f"| {label} | {np.mean(losses):.4f} | {np.mean(diffs):+.2f}% ({per}) | {up:,.0f} | "
              f"{off_up / up:.1f} | {down:,.0f} | {off_down / down:.1f} |")
    print(f"(the codec-off run sends {off_up:,.0f} B up per site per round: fp32 arrays of {fp32:,} B as "
          f"Flower serialises them; the downlink counts the train and the evaluate message of a round)")
    print(throughput(args.mib, "dithered B 1, A 3", TransportSettings()))
    print(throughput(args.mib, "top-5% int4", TransportSettings(uplink_dither=0.0, policy=(), uplink_topk=0.05)))
    print(throughput(args.mib, "dense int4", TransportSettings(uplink_dither=0.0, policy=())))


if __name__ == "__main__":
    main()
