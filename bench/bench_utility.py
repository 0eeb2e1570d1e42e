"""What DP costs in utility: the demo federation with DP-SGD (ε = 3) and without.

    .venv/bin/python bench/bench_utility.py [--seeds 3] [--set key=value ...]

Runs configs/simulation.yaml (3 sites, 3 rounds, the shipped pretrained base and the private defaults) with DP on,
for every noise seed, and once with DP off, and prints the held-out loss before and after, and the share of the
non-private loss reduction that each private run keeps (mean and spread; the goal is at least 0.80).
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
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="a config override, e.g. model.preset=deepseek-v3-tiny")
    args = ap.parse_args()
    from fedsecure.config import parse_override

    extra = dict(parse_override(x) for x in args.set)
    base = run({**extra, "privacy.enabled": False, "site.privacy.dp_required": False})
    dp = [run({**extra, "site.noise_seed": s}) for s in range(args.seeds)]
    init = base["initial_eval_loss"]
    dp_final = statistics.mean(s["final_eval_loss"] for s in dp)
    eps = max(site["epsilon_spent"] for s in dp for site in s["privacy"]["sites"].values())
    print(f"# bench_utility: configs/simulation.yaml {extra or ''}, {len(dp)} DP noise seeds")
    print(f"initial held-out loss          {init:.4f}")
    print(f"non-private final              {base['final_eval_loss']:.4f}")
    per_seed = ", ".join(f"{s['final_eval_loss']:.4f}" for s in dp)
    print(f"DP (eps <= {eps:.3f}) final       {dp_final:.4f}  (per seed: {per_seed})")
    keep = [(init - s["final_eval_loss"]) / (init - base["final_eval_loss"]) for s in dp]
    spread = f"{min(keep):.2f}-{max(keep):.2f}" + (f", sd {statistics.stdev(keep):.3f}" if len(keep) > 1 else "")
    print(f"DP keeps {statistics.mean(keep):.2f}x of the non-private loss reduction (per seed "
          f"{', '.join(f'{k:.2f}' for k in keep)}; range {spread})")


if __name__ == "__main__":
    main()
