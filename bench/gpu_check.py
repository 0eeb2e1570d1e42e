"""One GPU, the real R1-Distill-Qwen-1.5B architecture (random weights), bfloat16: throughput, the cost of DP, and
peak memory against `fedsecure model plan`. For a session lent a GPU machine; bench/gpu_check.sh runs it.

    .venv/bin/python bench/gpu_check.py [--config r1-distill-qwen-1.5b] [--batch 8] [--seq 512] [--steps 5]
    .venv/bin/python bench/gpu_check.py --device cpu --config r1-distill-qwen-tiny --batch 2 --seq 32 --steps 1

Builds the model from its shipped config.json on the device in ``--dtype`` (no download), attaches LoRA r=8
(float32), and times ``--steps`` steps (after 2 warm-up steps) of: non-private AdamW (the baseline), DP-SGD
with Opacus ``ew`` per-sample gradients, and DP-SGD with ``hooks`` and gradient checkpointing. For each: step
seconds, tokens a second, the ratio to the baseline, and the device's peak allocated memory against the plan's
estimate (the plan without its runtime allowance, which the allocator does not see). Prints a Markdown table
and, with ``--out FILE``, writes the figures as JSON. The ``--device cpu`` form is the suite's smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace, mode: str) -> dict:
    import torch
    from opacus.optimizers import DPOptimizer
    from transformers import AutoModelForCausalLM

    from fedsecure.config import PRESETS, LoraSettings
    from fedsecure.model.catalog import named_config
    from fedsecure.model.lora import attach_lora
    from fedsecure.model.presets import preset_config, torch_dtype
    from fedsecure.training.dpsgd import unwrap, wrap
    from fedsecure.training.local import activation_checkpointing, per_sequence_loss
    from fedsecure.training.memory import plan_memory

    config = preset_config(args.config) if args.config in PRESETS else named_config(args.config)
    dtype = torch_dtype(args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = attach_lora(base, LoraSettings(r=8))
    params = [p for p in model.parameters() if p.requires_grad]
    private, checkpointing = mode != "non-private", mode == "dp-hooks-checkpointing"
    gsm = wrap(model, "hooks" if checkpointing else "ew") if private else model
    opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4)
    if private:
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=args.batch,
                          loss_reduction="mean")
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(ids)
    model.train()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with activation_checkpointing(model, checkpointing):
        for i in range(2 + args.steps):
            _sync(args.device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = gsm(ids, attention_mask=mask) if private and not checkpointing else \
                gsm(input_ids=ids, attention_mask=mask)
            per_sequence_loss(out.logits, ids).mean().backward()
            opt.step()
            _sync(args.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    if private:
        unwrap(gsm, model)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    plan = plan_memory(config, LoraSettings(r=8), dtype, args.batch, args.seq, private=private,
                       device=args.device, checkpointing=checkpointing)
    step = statistics.median(times)
    return {"mode": mode, "step_s": step, "tokens_per_s": args.batch * args.seq / step, "peak_gib": None if peak is None
            else peak / 2**30, "plan_gib": (plan.total - plan.runtime) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="r1-distill-qwen-1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (run it on a GPU machine, or pass --device cpu)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for mode in ("non-private", "dp-ew", "dp-hooks-checkpointing"):
        rows.append(run(args, mode))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]["step_s"]
    print(f"# gpu_check: {args.config} (random weights) in {args.dtype} on {name}, LoRA r=8, batch {args.batch} x "
          f"{args.seq}, torch {torch.__version__}")
    print("| mode | step | tokens/s | x non-private | peak allocated | plan (no runtime) | plan / peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        ratio = "n/a" if r["peak_gib"] is None else f"{r['plan_gib'] / r['peak_gib']:.2f}"
        print(f"| {r['mode']} | {r['step_s']:.3f} s | {r['tokens_per_s']:,.0f} | {r['step_s'] / base:.2f} | {peak} | "
              f"{r['plan_gib']:.2f} GiB | {ratio} |", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": name, "config": args.config, "dtype": args.dtype, "batch": args.batch,
                       "seq": args.seq, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
