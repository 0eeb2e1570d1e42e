"""Why transport cannot reach 32x within 1% loss here: the measurements behind BENCHMARKS.md.

    .venv/bin/python bench/bench_transport_why.py [--noise-seed 0]

On the demo simulation (configs/simulation.yaml, DP ε = 3), codec off unless stated:
1. How much of a round update is shared signal: the correlation between two sites' updates of the
   same round (LoRA A and B separately) and their kurtosis (3 = Gaussian).
2. How sensitive the loss is to extra noise: σ raised so that the DP noise variance grows by a third
   (what an ideal unbiased 1-bit coder would add at least), final loss vs the calibrated σ.
3. Where the codec's error hurts: dithered quantization (step 2 x RMS) on the A matrices only and on
   the B matrices only (the other kept float32), final loss vs codec off.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

import fedsecure.federation.site as client
from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: dict, seed: int, capture: list | None = None) -> tuple[float, dict]:
    real = client.adapter_delta

    def recording(new, old):
        delta = real(new, old)
        capture.append(delta)
        return delta

    if capture is not None:
        client.adapter_delta = recording
    try:
        cfg = load_config(ROOT / "configs" / "simulation.yaml", {"site.noise_seed": seed, **overrides})
        with tempfile.TemporaryDirectory() as tmp:
            summary = simulate(cfg, run_dir=Path(tmp) / "run")
            privacy = json.loads((Path(tmp) / "run" / "privacy.json").read_text())
    finally:
        client.adapter_delta = real
    return summary["final_eval_loss"], privacy


def _sigma(privacy: dict) -> float:
    return max(float(site["sigma"]) for site in privacy["sites"].values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noise-seed", type=int, default=0)
    args = ap.parse_args()
    seed, off = args.noise_seed, {"transport.enabled": False}
    deltas: list[dict] = []
    base, privacy = run(off, seed, deltas)
    sites = 3
    print(f"# bench_transport_why: configs/simulation.yaml, noise seed {seed}; codec off: final loss {base:.4f}")
    print("| round | part | correlation between sites (mean of pairs) | kurtosis |")
    print("|---|---|---|---|")
    for r in range(len(deltas) // sites):
        group = deltas[sites * r: sites * (r + 1)]
        for part in ("lora_A", "lora_B"):
            x = np.stack([np.concatenate([d[k].ravel() for k in sorted(d) if part in k]) for d in group])
            corr = np.mean([np.corrcoef(x[i], x[j])[0, 1] for i in range(sites) for j in range(i + 1, sites)])
            kurt = float(((x - x.mean(1, keepdims=True)) ** 4).mean() / x.var() ** 2)
            print(f"| {r + 1} | {part} | {corr:.3f} | {kurt:.2f} |")
    sigma = _sigma(privacy)
    more, _ = run({**off, "privacy.noise_multiplier": sigma * math.sqrt(4 / 3)}, seed)
    print(f"σ {sigma:.3f} -> {sigma * math.sqrt(4 / 3):.3f} (DP noise variance x 4/3): final loss {more:.4f} = "
          f"{100 * (more - base) / base:+.2f}% vs calibrated σ")
    dq = {"transport.uplink_dither": 2.0}
    a_only, _ = run({**dq, "transport.policy": ["*lora_B*=32/1.0"]}, seed)
    b_only, _ = run({**dq, "transport.policy": ["*lora_A*=32/1.0"]}, seed)
    print(f"dithered (2 x RMS) on A only: final loss {a_only:.4f} = {100 * (a_only - base) / base:+.2f}% vs codec off")
    print(f"dithered (2 x RMS) on B only: final loss {b_only:.4f} = {100 * (b_only - base) / base:+.2f}% vs codec off")


if __name__ == "__main__":
    main()
