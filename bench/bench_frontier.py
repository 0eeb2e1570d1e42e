"""The bytes-vs-loss frontier: what is trained (LoRA rank, alpha = 2r) x how it travels (codec settings), DP on.

    .venv/bin/python bench/bench_frontier.py [--seeds 0,1,2] [--rounds 3] [--svg docs/frontier.svg] [--cache F]

Every point is the seeded demo federation (configs/simulation.yaml: the shipped pretrained base, 3 sites, DP at
eps = 3) for each DP noise seed: its mean uplink and downlink bytes per site and round, and its final held-out loss.
The reference is the tuned default (r = 8) sending fp32 arrays (codec off), per seed: paired, same data and noise.
``--cache F`` keeps each finished point (JSON lines) and reuses it when the sweep is run again with the same
seeds and rounds: a long sweep that is interrupted goes on where it stopped (the runs are seeded, so a point
is the same whenever it runs). Prints a table (every point, frontier points marked), the smallest uplink
whose mean loss is within 1% of the reference, as a ratio to the reference's fp32 update (and the downlink
likewise), and writes the plot as SVG.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from fedsecure.config import load_config
from fedsecure.launch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]

RANKS = [8, 4, 2, 1]
CODECS = {
    "fp32 (codec off)": {"transport.enabled": False},
    "dithered B0.75/A2": {"transport.uplink_dither": 0.75, "transport.policy": ["*lora_A*=d2/1.0"]},
    "dithered B1/A3 (default)": {},
    "dithered B1.5/A4": {"transport.uplink_dither": 1.5, "transport.policy": ["*lora_A*=d4/1.0"]},
    "dithered B2/A6 (slow link)": {"transport.uplink_dither": 2.0, "transport.policy": ["*lora_A*=d6/1.0"]},
    "dithered B3/A8": {"transport.uplink_dither": 3.0, "transport.policy": ["*lora_A*=d8/1.0"]},
    "dithered B2/A6 + down d1": {"transport.uplink_dither": 2.0, "transport.policy": ["*lora_A*=d6/1.0"],
                                "transport.downlink_dither": 1.0},
}
COLOURS = {8: "#1f77b4", 4: "#2ca02c", 2: "#ff7f0e", 1: "#d62728"}


def run(overrides: dict, seed: int, rounds: int) -> tuple[float, float, float, int]:
    """(final loss, uplink B/site/round, downlink B/site/round, fp32 update bytes)."""
    cfg = load_config(ROOT / "configs" / "simulation.yaml",
                      {"site.noise_seed": seed, "federation.rounds": rounds, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(cfg, run_dir=Path(tmp) / "run", announce=lambda *_: None)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    sites = [m for m in rows if m["site"] != "federation" and m["round"] >= 1 and "bytes_up" in m]
    return (summary["final_eval_loss"], statistics.mean(m["bytes_up"] for m in sites),
            statistics.mean(m["bytes_down"] for m in sites), sites[0]["fp32_bytes"])


def frontier(points: list[dict]) -> set[int]:
    """Indices of the points no other point beats on both uplink bytes and loss."""
    return {i for i, p in enumerate(points)
            if not any(q["up"] <= p["up"] and q["loss"] <= p["loss"] and (q["up"], q["loss"]) != (p["up"], p["loss"])
                       for q in points)}


def svg(points: list[dict], front: set[int], ref_loss: float, width: int = 640, height: int = 400) -> str:
    """Loss against uplink bytes (log scale), one colour per rank, the frontier joined, the 1% line dashed."""
    pad = 60
    xs = [math.log10(p["up"]) for p in points]
    ys = [p["loss"] for p in points] + [ref_loss * 1.01]
    x0, x1, y0, y1 = min(xs) - 0.05, max(xs) + 0.05, min(ys) - 0.01, max(ys) + 0.01

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           '<title>fedsecure: final held-out loss against uplink bytes per site and round (DP, eps = 3)</title>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>']
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(f'<text x="{px(e):.1f}" y="{height - pad + 16}" text-anchor="middle">1e{e}</text>')
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{pad - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 18}" text-anchor="middle">uplink bytes per site and round '
               '(log scale)</text>')
    out.append(f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
               'final held-out loss</text>')
    out.append(f'<line x1="{pad}" y1="{py(ref_loss * 1.01):.1f}" x2="{width - pad}" y2="{py(ref_loss * 1.01):.1f}" '
               'stroke="grey" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{width - pad}" y="{py(ref_loss * 1.01) - 4:.1f}" text-anchor="end" fill="grey">'
               'reference (r = 8, fp32) + 1%</text>')
    chain = sorted((p for i, p in enumerate(points) if i in front), key=lambda p: p["up"])
    out.append('<polyline fill="none" stroke="black" stroke-width="1" points="'
               + " ".join(f"{px(math.log10(p['up'])):.1f},{py(p['loss']):.1f}" for p in chain) + '"/>')
    for p in points:
        out.append(f'<circle cx="{px(math.log10(p["up"])):.1f}" cy="{py(p["loss"]):.1f}" r="4" '
                   f'fill="{COLOURS[p["r"]]}"><title>r={p["r"]}, {p["codec"]}</title></circle>')
    ranks = sorted({p["r"] for p in points}, reverse=True)
    for k, (r, colour) in enumerate((r, COLOURS[r]) for r in ranks):
        out.append(f'<circle cx="{width - pad - 60}" cy="{pad + 14 * k}" r="4" fill="{colour}"/>'
                   f'<text x="{width - pad - 50}" y="{pad + 14 * k + 4}">LoRA r = {r}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
    ap.add_argument("--codecs", default=",".join(CODECS), help="codec labels, comma-separated (a subset of CODECS)")
    ap.add_argument("--extra-r8", default="", help="codec labels tried at r = 8 only (comma-separated)")
    ap.add_argument("--svg", default=str(ROOT / "docs" / "frontier.svg"))
    ap.add_argument("--cache", default="", help="JSON-lines file of finished points (read and appended)")
    args = ap.parse_args()
    chosen = {"fp32 (codec off)", *[c for c in args.codecs.split(",") if c]}
    extra_r8 = {c for c in args.extra_r8.split(",") if c}
    unknown = (chosen | extra_r8) - set(CODECS)
    if unknown:
        raise SystemExit(f"unknown codec label(s) {sorted(unknown)}; known: {list(CODECS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Path(args.cache) if args.cache else None
    done = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            p = json.loads(line)
            if p.get("seeds") == seeds and p.get("rounds") == args.rounds:
                done[(p["r"], p["codec"])] = p
    points: list[dict] = []
    ref = None
    for r in (int(x) for x in args.ranks.split(",")):
        for codec, overrides in CODECS.items():
            if codec not in chosen | (extra_r8 if r == 8 else set()) or (r != 8 and codec == "fp32 (codec off)"):
                continue
            p = done.get((r, codec))
            if p is None:
                o = {"model.lora.r": r, "model.lora.alpha": 2 * r, **overrides}
                res = [run(o, s, args.rounds) for s in seeds]
                p = {"r": r, "codec": codec, "losses": [x[0] for x in res],
                     "loss": statistics.mean(x[0] for x in res), "up": statistics.mean(x[1] for x in res),
                     "down": statistics.mean(x[2] for x in res), "fp32": res[0][3], "seeds": seeds,
                     "rounds": args.rounds}
                if cache is not None:
                    with cache.open("a") as f:
                        f.write(json.dumps(p) + "\n")
            points.append(p)
            if r == 8 and codec.startswith("fp32"):
                ref = p
            print(f"  r={r} {codec}: losses {[round(x, 4) for x in p['losses']]}, up {p['up']:,.0f} B", flush=True)
    assert ref is not None, "the reference (r = 8, fp32) must be in the sweep"
    front = frontier(points)
    print(f"# bench_frontier: configs/simulation.yaml (pretrained base, 3 sites, {args.rounds} rounds, DP eps = 3), "
          f"noise seeds {seeds}; reference r = 8 fp32: loss {ref['loss']:.4f}, {ref['up']:,.0f} B up")
    print("| LoRA r | codec | final loss (mean; per seed) | vs reference | uplink B/site/round | x fewer | "
          "downlink B/site/round | x fewer | frontier |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, p in sorted(enumerate(points), key=lambda t: t[1]["up"]):
        per = ", ".join(f"{x:.4f}" for x in p["losses"])
        print(f"| {p['r']} | {p['codec']} | {p['loss']:.4f} ({per}) | {100 * (p['loss'] / ref['loss'] - 1):+.2f}% | "
              f"{p['up']:,.0f} | {ref['up'] / p['up']:.1f} | {p['down']:,.0f} | {ref['down'] / p['down']:.1f} | "
              f"{'yes' if i in front else ''} |")
    within = [p for p in points if p["loss"] <= ref["loss"] * 1.01]
    best = min(within, key=lambda p: p["up"])
    best_down = min(within, key=lambda p: p["down"])
    print(f"smallest uplink within 1% of the reference: r={best['r']}, {best['codec']}: {best['up']:,.0f} B, "
          f"{ref['up'] / best['up']:.1f}x fewer than the fp32 update ({100 * (best['loss'] / ref['loss'] - 1):+.2f}%)")
    print(f"smallest downlink within 1%: r={best_down['r']}, {best_down['codec']}: {best_down['down']:,.0f} B, "
          f"{ref['down'] / best_down['down']:.1f}x fewer")
    Path(args.svg).parent.mkdir(parents=True, exist_ok=True)
    Path(args.svg).write_text(svg(points, front, ref["loss"]))
    print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
