"""Compliance report generation for a large run, as a ratio to the simulation's own summary step.

    .venv/bin/python bench/bench_report.py [--sites 50] [--rounds 100] [--settings 10] [--repeats 3]

A synthetic finished run (tests/synthetic_run.py: summary.json, metrics.jsonl, a hash-chained audit log with
one attestation entry per site per round) of ``--sites`` × ``--rounds``, the sites spread over ``--settings``
distinct (σ, q) pairs (hospitals of different sizes calibrate different noise). Timed in the same process,
interleaved, caches of both accountants cleared before every repeat:

* baseline: the coordinator's summary step at the end of a run (privacy.json/md, summary.json/md);
* report: ``build_run_report`` (audit-log verification, per-site ε by Opacus and recomputed by dp-accounting)
  plus ``write_report`` (JSON, Markdown, HTML with SVG charts, Ed25519 DSSE signature over the files);
* and, apart, ``build_run_report`` split into its accounting and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsecure.privacy import accounting  # noqa: E402
from fedsecure.reports import mechanisms  # noqa: E402
from fedsecure.reports.compliance import build_run_report  # noqa: E402
from fedsecure.reports.report_files import write_report  # noqa: E402
from tests.synthetic_run import make_run, write_summary_files  # noqa: E402


def _clear() -> None:
    accounting._epsilon.cache_clear()
    mechanisms._recompute.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--settings", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = make_run(run, sites=args.sites, rounds=args.rounds, groups=args.settings,
                           exact_every=args.rounds)
        setup = time.perf_counter() - t0
        build_run_report(run)  # imports (Opacus, dp-accounting) out of the timings, as in a finished run
        times: dict[str, list[float]] = {"summary step": [], "report (build + write + sign)": [],
                                         "report build": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            write_summary_files(run, summary)
            times["summary step"].append(time.perf_counter() - t0)
            _clear()
            t0 = time.perf_counter()
            report = build_run_report(run)
            t1 = time.perf_counter()
            write_report(report, Path(tmp) / "out", signing_key=Path(tmp) / "k.key.pem")
            t2 = time.perf_counter()
            times["report build"].append(t1 - t0)
            times["report (build + write + sign)"].append(t2 - t0)
        _clear()
        t0 = time.perf_counter()
        for s in report["sites"]:
            mechanisms.recompute(s["mechanism"], s["delta"], s["accountant"])
        pld = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in sorted((Path(tmp) / "out").iterdir())}
    base = statistics.median(times["summary step"])
    print(f"# {args.sites} sites x {args.rounds} rounds, {args.settings} distinct (sigma, q); setup {setup:.1f} s; "
          f"median of {args.repeats}")
    print("| step | median s | x summary step |")
    print("| --- | --- | --- |")
    for name, xs in times.items():
        med = statistics.median(xs)
        print(f"| {name} | {med:.3f} | {med / base:.1f} |")
    print(f"| of which dp-accounting recomputation ({args.settings} distinct histories) | {pld:.3f} | "
          f"{pld / base:.1f} |")
    print("files:", json.dumps(sizes))


if __name__ == "__main__":
    main()
