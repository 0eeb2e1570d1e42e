"""A quantized frozen base (model.quantization int8 | nf4, bitsandbytes) against the unquantized one: memory and loss.

    .venv/bin/python bench/bench_quantized.py [--seeds 0]

For the demo (configs/simulation.yaml: the pretrained deepseek-v3-tiny-clinical base, 3 sites, 3 rounds, DP at
ε = 3) with the base unquantized (the baseline), int8 and nf4 (attention projections kept in float32, the
default policy; then also every Linear quantized), in the same run: the bytes of the base's weights (all of
them, and those of the Linear modules bitsandbytes converts), the held-out loss of the base before training
(round 0) and after the run, as ratios / differences to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

POLICIES = [("none", False), ("int8", False), ("nf4", False), ("int8", True), ("nf4", True)]


def weight_bytes(quantization: str, attention: bool) -> tuple[int, int]:
    from fedsecure.config import load_config
    from fedsecure.model import load_model_and_tokenizer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "simulation.yaml", {"model.quantization": quantization,
                                                            "model.quantize_attention": attention})
    model, _ = load_model_and_tokenizer(cfg.model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if n.endswith("proj.weight") and ".experts." not in n)
    return total, linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    from fedsecure.config import load_config
    from fedsecure.launch.simulate import simulate

    root = Path(__file__).resolve().parents[1]
    rows = {}
    for quantization, attention in POLICIES:
        total, linear = weight_bytes(quantization, attention)
        first, final = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = load_config(root / "configs" / "simulation.yaml", {
                "site.noise_seed": seed, "model.quantization": quantization, "model.quantize_attention": attention})
            with tempfile.TemporaryDirectory() as tmp:
                summary = simulate(cfg, run_dir=Path(tmp) / "run", announce=lambda *_: None)
            first.append(summary["rounds"][0]["eval_loss"])
            final.append(summary["final_eval_loss"])
        rows[(quantization, attention)] = (total, linear, statistics.mean(first), statistics.mean(final))
        print(f"  {quantization} (attention {'quantized' if attention else 'kept'}): {total:,} B weights, "
              f"loss {rows[(quantization, attention)][2]:.4f} -> {rows[(quantization, attention)][3]:.4f}", flush=True)
    t0, l0, f0, e0 = rows[("none", False)]
    print(f"# bench_quantized: demo (deepseek-v3-tiny-clinical, 3 sites, 3 rounds, DP eps = 3), seeds {args.seeds}")
    print("| frozen base | all weights | x baseline | attention + dense/shared MLP Linear weights | x baseline | "
          "held-out loss, round 0 | after 3 rounds | change |")
    print("|---|---|---|---|---|---|---|---|")
    for (q, att), (t, lin, f, e) in rows.items():
        label = "float32 (baseline)" if q == "none" else f"{q}, attention {'quantized too' if att else 'kept float32'}"
        print(f"| {label} | {t:,} B | {t / t0:.2f} | {lin:,} B | {lin / l0:.2f} | {f:.4f} | {e:.4f} | "
              f"{100 * (e / e0 - 1):+.2f}% |")


if __name__ == "__main__":
    main()
