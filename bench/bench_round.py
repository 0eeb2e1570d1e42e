"""Seconds per round: local training vs everything else (framework overhead).

    .venv/bin/python bench/bench_round.py [--sites 3] [--rounds 3] [--engine inprocess|ray]

Runs the demo federation (deepseek-v3-tiny, synthetic data) and splits each round's wall time
into the sites' local training, their held-out evaluation, and the rest: building messages,
copying records, setting and reading adapter state, aggregation and writing the run directory.
The baseline of the ratio is local training measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", default="inprocess", choices=["inprocess", "ray"])
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "simulation.yaml",
                      {"federation.sites": args.sites, "federation.rounds": args.rounds,
                       "federation.engine": args.engine})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = simulate(cfg, run_dir=Path(tmp) / "run")
        total = time.perf_counter() - t0
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for r in range(1, args.rounds + 1):
        sites = [m for m in metrics if m["round"] == r and m["site"] != "federation"]
        fed = next(m for m in metrics if m["round"] == r and m["site"] == "federation")
        train = sum(m["train_seconds"] for m in sites)
        ev = sum(m["eval_seconds"] for m in sites)
        rows.append((r, fed["seconds"], train, ev, fed["seconds"] - train - ev))
    print(f"# bench_round: {args.sites} sites, deepseek-v3-tiny, engine={args.engine}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'round':>5} {'round s':>9} {'train s':>9} {'eval s':>9} {'other s':>9} {'other/train':>12}")
    for r, wall, train, ev, other in rows:
        print(f"{r:>5} {wall:>9.3f} {train:>9.3f} {ev:>9.3f} {other:>9.3f} {other / train:>12.3f}")
    wall = sum(x[1] for x in rows)
    train = sum(x[2] for x in rows)
    ev = sum(x[3] for x in rows)
    other = wall - train - ev
    print(f"mean seconds per round: {wall / len(rows):.3f} (local training {train / len(rows):.3f}, "
          f"evaluation {ev / len(rows):.3f}, framework overhead {other / len(rows):.3f})")
    print(f"framework overhead / local training = {other / train:.3f}x   "
          f"(whole run incl. start-up and round 0: {total:.1f} s; final loss "
          f"{summary['final_eval_loss']:.4f} from {summary['initial_eval_loss']:.4f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
