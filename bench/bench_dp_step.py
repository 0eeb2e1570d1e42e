"""DP-SGD step time and peak memory against non-private LoRA training, same model and batch.

    .venv/bin/python bench/bench_dp_step.py [--preset deepseek-v3-tiny] [--batch 32] [--steps 30]
                                            [--dtypes float32,bfloat16,float16]

Each mode runs in its own fresh process (so peak RSS is its own): non-private AdamW steps on
a fixed batch of ``--batch`` records, then DP-SGD steps (Opacus, per-sample gradients, clipping,
noise) with Poisson sampling at the same expected batch size, in the ``ew`` and ``hooks``
per-sample-gradient modes. Prints median step milliseconds and the peak-RSS growth during the
steps, each as a ratio to the non-private baseline measured in the same invocation, for each dtype of the
frozen base (``model.dtype``; LoRA is float32 in all of them) against the non-private steps in that dtype.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("nodp", "dp-ew", "dp-hooks")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_mode(mode: str, preset: str, batch: int, steps: int, warmup: int, dtype: str = "float32") -> dict:
    import torch

    from fedsecure.config import LoraSettings, ModelSettings
    from fedsecure.data.dataset import TokenizedDataset, collate
    from fedsecure.data.synth import corpus
    from fedsecure.model import attach_lora, load_model_and_tokenizer
    from fedsecure.training.dpsgd import unwrap, wrap
    from fedsecure.training.local import per_sequence_loss, trainable_parameters

    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(ModelSettings(preset=preset, device="cpu", dtype=dtype))
    model = attach_lora(base, LoraSettings(r=8))
    texts = corpus(sites=2, records_per_site=batch * 8, seed=1)
    data = TokenizedDataset.from_texts(texts, tok, 96)
    n = len(data)
    q = batch / n
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    times = []
    if mode == "nodp":
        opt = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        rss0 = _rss_mb()
        for i in range(warmup + steps):
            idx = torch.randperm(n, generator=gen)[:batch].tolist()
            t0 = time.perf_counter()
            b = collate([data[j] for j in idx], tok.pad_id)
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            per_sequence_loss(out.logits, b["labels"]).mean().backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    else:
        from opacus.optimizers import DPOptimizer

        gsm_mode = mode.split("-")[1]
        gsm = wrap(model, gsm_mode)
        opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=batch, loss_reduction="mean", generator=torch.Generator().manual_seed(1))
        model.train()
        rss0 = _rss_mb()
        for i in range(warmup + steps):
            idx = (torch.rand(n, generator=gen) < q).nonzero().flatten().tolist() or [0]
            t0 = time.perf_counter()
            b = collate([data[j] for j in idx], tok.pad_id)
            opt.zero_grad(set_to_none=True)
            if gsm_mode == "ew":
                out = gsm(b["input_ids"], attention_mask=b["attention_mask"])
            else:
                out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            per_sequence_loss(out.logits, b["labels"]).mean().backward()
            opt.step()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * batch / len(idx))  # normalise to the expected batch
        unwrap(gsm, model)
    return {"mode": mode, "median_ms": statistics.median(times) * 1000, "peak_rss_growth_mb": _rss_mb() - rss0,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "records": n, "dtype": dtype}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3-tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--repeats", type=int, default=1, help="run the whole comparison this many times")
    ap.add_argument("--dtypes", default="float32", help="dtypes of the frozen base, comma-separated")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.preset, args.batch, args.steps, args.warmup, args.dtype)))
        return
    for dtype in args.dtypes.split(","):
        compare(args, dtype)


def compare(args: argparse.Namespace, dtype: str) -> None:
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so machine noise hits every mode alike
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--batch",
                                  str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--dtype", dtype], capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base_ms = statistics.median(r["median_ms"] for r in rows["nodp"])
    base_mb = statistics.median(r["peak_rss_growth_mb"] for r in rows["nodp"])
    first = rows["nodp"][0]
    print(f"# bench_dp_step: {args.preset} in {dtype}, LoRA r=8 (float32), batch {args.batch} (DP: Poisson, expected "
          f"{args.batch}), {args.steps} steps x {args.repeats}, torch {first['torch']}, {first['threads']} threads")
    print(f"{'mode':>9} {'step ms':>9} {'x no-DP':>8} {'peak RSS +MB':>13} {'x no-DP':>8}")
    for mode in MODES:
        ms = statistics.median(r["median_ms"] for r in rows[mode])
        mb = statistics.median(r["peak_rss_growth_mb"] for r in rows[mode])
        print(f"{mode:>9} {ms:>9.1f} {ms / base_ms:>8.2f} {mb:>13.1f} {mb / max(base_mb, 1e-9):>8.2f}", flush=True)


if __name__ == "__main__":
    main()
