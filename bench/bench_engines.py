"""In-process grid vs Flower's Ray simulation engine, same apps, same federation.

    .venv/bin/python bench/bench_engines.py [--sites 2] [--rounds 1]

Prints wall seconds of each engine for the whole run (start-up included) and the ratio
ray / inprocess. Both runs use the same seeds, so they also report the same final loss.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    seconds, losses = {}, {}
    for engine in ("inprocess", "ray"):
        cfg = load_config(ROOT / "configs" / "simulation.yaml", {
            "federation.sites": args.sites, "federation.rounds": args.rounds, "federation.engine": engine})
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = simulate(cfg, run_dir=Path(tmp) / "run")
            seconds[engine] = time.perf_counter() - t0
            losses[engine] = summary["final_eval_loss"]
    print(f"# bench_engines: {args.sites} sites, {args.rounds} round(s), deepseek-v3-tiny")
    for engine in seconds:
        print(f"{engine:>10}: {seconds[engine]:7.2f} s   final held-out loss {losses[engine]:.6f}")
    print(f"ray / inprocess wall time = {seconds['ray'] / seconds['inprocess']:.1f}x")


if __name__ == "__main__":
    main()
