"""`fedsecure model plan` against the measured peak memory of one DP-SGD step on this CPU.

    .venv/bin/python bench/bench_memory_plan.py

For each case (the tiny presets as the demo trains them, and a ~120 M-parameter Qwen2 model, the
R1-Distill-Qwen architecture smaller, in float32 and bfloat16), a fresh process imports everything, then
builds the model from its config in its dtype, attaches LoRA, and runs one DP-SGD step (Opacus ``ew``
per-sample gradients, clipping, noise, AdamW) on a full batch; its peak RSS growth over the state after the
imports (VmHWM) is the measurement. The plan (:func:`fedsecure.training.memory.plan_memory`) is computed
without any weight; printed: both and their ratio (goal: the plan within 20% of the measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: (model, dtype, batch, seq, gradient checkpointing: then the hooks per-sample mode, else ew)
CASES = [("deepseek-v3-tiny", "float32", 32, 96, False), ("r1-distill-qwen-tiny", "float32", 32, 96, False),
         ("qwen2-120m", "float32", 4, 256, False), ("qwen2-120m", "bfloat16", 4, 256, False),
         ("qwen2-120m", "float32", 4, 256, True), ("deepseek-v3-tiny", "float32", 32, 96, True)]


def _hwm_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def config_of(name: str):  # noqa: ANN201
    from transformers import Qwen2Config

    from fedsecure.model.presets import preset_config

    if name == "qwen2-120m":
        return Qwen2Config(vocab_size=32_000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False)
    return preset_config(name)


def measure(name: str, dtype: str, batch: int, seq: int, checkpointing: bool = False) -> dict:
    import torch
    from opacus.optimizers import DPOptimizer
    from transformers import AutoModelForCausalLM

    from fedsecure.config import LoraSettings
    from fedsecure.model.lora import attach_lora
    from fedsecure.model.presets import torch_dtype
    from fedsecure.training.dpsgd import unwrap, wrap
    from fedsecure.training.local import activation_checkpointing, per_sequence_loss

    config = config_of(name)
    torch.manual_seed(0)
    before = _hwm_mib()
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype)), LoraSettings(r=8))
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = wrap(model, "hooks" if checkpointing else "ew")
    opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=batch, loss_reduction="mean")
    ids = torch.randint(3, config.vocab_size, (batch, seq))
    model.train()
    with activation_checkpointing(model, checkpointing):
        if checkpointing:
            out = gsm(input_ids=ids, attention_mask=torch.ones_like(ids))
        else:
            out = gsm(ids, attention_mask=torch.ones_like(ids))
        per_sequence_loss(out.logits, ids).mean().backward()
    opt.step()
    unwrap(gsm, model)
    return {"measured_mib": _hwm_mib() - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        name, dtype, batch, seq, ckpt = args.case
        print(json.dumps(measure(name, dtype, int(batch), int(seq), ckpt == "True")))
        return
    import torch

    from fedsecure.config import LoraSettings
    from fedsecure.model.presets import torch_dtype
    from fedsecure.training.memory import plan_memory

    print("# bench_memory_plan: one DP-SGD step (ew, LoRA r=8), plan vs measured peak RSS growth, this CPU")
    print("| model | dtype | batch x seq | checkpointing | plan | measured | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    for name, dtype, batch, seq, ckpt in CASES:
        plan = plan_memory(config_of(name), LoraSettings(r=8), torch_dtype(dtype), batch, seq,
                           checkpointing=ckpt).total / 2**20
        out = subprocess.run([sys.executable, __file__, "--case", name, dtype, str(batch), str(seq), str(ckpt)],
                             capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])["measured_mib"]
        print(f"| {name} | {dtype} | {batch} x {seq} | {'on (hooks)' if ckpt else 'off (ew)'} | {plan:,.0f} MiB | "
              f"{got:,.0f} MiB | {plan / got:.2f} |", flush=True)
    del torch


if __name__ == "__main__":
    main()
