"""Transport: bytes per round vs fp32, final loss with the codec off and on, codec throughput.

    .venv/bin/python bench/bench_transport.py [--noise-seed 0] [--mib 64]

1. The same seeded demo simulation (configs/simulation.yaml, DP on) with ``transport.enabled``
   false and true: uplink and downlink bytes per round as a ratio to fp32, and the final
   held-out loss of both.
2. Encode + decode throughput of the uplink codec (top-k, int4, zstd) in MB/s of fp32 input, on a
   ``--mib`` MiB synthetic adapter.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsecure.config import TransportSettings, load_config
from fedsecure.simulation import simulate
from fedsecure.transport.codec import decode, encode, expected_manifest
from fedsecure.transport.session import uplink_policy

ROOT = Path(__file__).resolve().parents[1]


SETTINGS = {"off": {"transport.enabled": False}, "dense int4 (default)": {},
            "top-5% int4": {"transport.uplink_topk": 0.05}}


def run(overrides: dict, noise_seed: int, rounds: int) -> tuple[dict, list[dict]]:
    cfg = load_config(ROOT / "configs" / "simulation.yaml",
                      {"privacy.noise_seed": noise_seed, "federation.rounds": rounds, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(cfg, run_dir=Path(tmp) / "run")
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds (error feedback needs rounds to catch up)")
    args = ap.parse_args()
    results = {}
    for label, overrides in SETTINGS.items():
        summary, metrics = run(overrides, args.noise_seed, args.rounds)
        sites = [m for m in metrics if m["site"] != "federation" and m["round"] >= 1 and "bytes_up" in m]
        up = sum(m["bytes_up"] for m in sites) / len(sites)
        fp32 = sites[0]["fp32_bytes"]
        down = [m["bytes_down"] for m in metrics if m["site"] != "federation" and m["round"] >= 1]
        results[label] = (summary["final_eval_loss"], up, sum(down) / len(down), fp32)
    print(f"# bench_transport: configs/simulation.yaml (3 sites, {args.rounds} rounds, DP eps=3, "
          f"noise seed {args.noise_seed})")
    print(f"{'codec':>21} {'final loss':>11} {'vs off':>7} {'uplink B/site/round':>20} {'x fewer':>8} "
          f"{'downlink B/site/round':>22} {'x fewer':>8}")
    off = results["off"][0]
    for label, (loss, up, down, fp32) in results.items():
        print(f"{label:>21} {loss:>11.4f} {100 * (loss - off) / off:>+6.2f}% {up:>20.0f} {fp32 / up:>8.1f} "
              f"{down:>22.0f} {2 * fp32 / down:>8.1f}")
    print(f"(fp32 adapter {results['off'][3]} B; downlink counts the train and the evaluate message of a round)")
    rng = np.random.default_rng(0)
    n = args.mib * (1 << 20) // 4 // 64
    tensors = {f"layers.{i}.lora_{'AB'[i % 2]}.weight": rng.standard_normal((64, n // 64), np.float32)
               for i in range(64)}
    size = sum(v.nbytes for v in tensors.values())
    policy = uplink_policy(TransportSettings(uplink_topk=0.05))  # the slow-link setting
    t0 = time.perf_counter()
    payload, _ = encode(tensors, policy, seed=0)
    t1 = time.perf_counter()
    decode(payload, expected_manifest({k: v.shape for k, v in tensors.items()}), max_bytes=1 << 40)
    t2 = time.perf_counter()
    mb = size / 1e6
    print(f"codec throughput on {size / (1 << 20):.0f} MiB fp32: encode {mb / (t1 - t0):.0f} MB/s, "
          f"decode {mb / (t2 - t1):.0f} MB/s, encode+decode {mb / (t2 - t0):.0f} MB/s; "
          f"payload {len(payload) / 1e6:.2f} MB = {size / len(payload):.1f}x fewer bytes")


if __name__ == "__main__":
    main()
