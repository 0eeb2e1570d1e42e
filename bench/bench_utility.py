"""What DP costs in utility: the demo federation with DP-SGD (ε = 3) and without.

    .venv/bin/python bench/bench_utility.py [--seeds 2]

Runs configs/simulation.yaml (3 sites, 3 rounds, deepseek-v3-tiny) with DP on, for a few noise
seeds, and once with DP off, and prints the held-out loss before and after, and the share of
the non-private loss reduction that the private run keeps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: dict) -> dict:
    cfg = load_config(ROOT / "configs" / "simulation.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        return simulate(cfg, run_dir=Path(tmp) / "run")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    base = run({"privacy.enabled": False, "site.privacy.dp_required": False})
    dp = [run({"site.noise_seed": s}) for s in range(args.seeds)]
    init = base["initial_eval_loss"]
    dp_final = statistics.mean(s["final_eval_loss"] for s in dp)
    eps = max(site["epsilon_spent"] for s in dp for site in s["privacy"]["sites"].values())
    print(f"# bench_utility: configs/simulation.yaml, {len(dp)} DP noise seeds")
    print(f"initial held-out loss          {init:.4f}")
    print(f"non-private final              {base['final_eval_loss']:.4f}")
    per_seed = ", ".join(f"{s['final_eval_loss']:.4f}" for s in dp)
    print(f"DP (eps <= {eps:.3f}) final       {dp_final:.4f}  (per seed: {per_seed})")
    print(f"DP keeps {(init - dp_final) / (init - base['final_eval_loss']):.2f}x of the non-private loss reduction")


if __name__ == "__main__":
    main()
