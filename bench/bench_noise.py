"""What noise nobody else can know costs: the OS-CSPRNG Gaussian against torch's seeded generator.

    .venv/bin/python bench/bench_noise.py [--repeats 5]

Three figures, each a ratio against the seeded baseline measured in the same run:

1. noise for one tensor of N values (N = the demo adapter's LoRA size, and 20 M, about a 7B model's
   LoRA r=8): ``SystemRandomness.gaussian`` (os.urandom, Box-Muller in float64, four draws per
   value as in Opacus' secure mode) against ``torch.normal`` with a seeded generator (Opacus'
   default path, one draw per value);
2. one whole DP-SGD round at a site of the demo (deepseek-v3-tiny, 16 steps, expected batch 32),
   through ``train_private`` with each source.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from fedsecure.config import LoraSettings, ModelSettings, TrainSettings
    from fedsecure.data.dataset import TokenizedDataset
    from fedsecure.data.synth import corpus
    from fedsecure.model import adapter_state, attach_lora, load_model_and_tokenizer, set_adapter_state
    from fedsecure.privacy.guard import DPStepPlan
    from fedsecure.privacy.noise import SeededRandomness, SystemRandomness
    from fedsecure.training.dpsgd import train_private

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(ModelSettings())
    model = attach_lora(base, LoraSettings(r=8))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"# bench_noise: torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print(f"{'noise for':>24} {'seeded ms':>10} {'OS-CSPRNG ms':>13} {'ratio':>7}")
    for n, label in ((lora, f"{lora:,} values (demo)"), (20_000_000, "20,000,000 values")):
        ref = torch.zeros(n)
        seeded, system = SeededRandomness(1), SystemRandomness()
        a = _median_s(lambda s=seeded, r=ref: s.gaussian(r, 1.0), args.repeats)
        b = _median_s(lambda s=system, r=ref: s.gaussian(r, 1.0), args.repeats)
        print(f"{label:>24} {a * 1000:>10.2f} {b * 1000:>13.2f} {b / a:>7.2f}")
    data = TokenizedDataset.from_texts(corpus(sites=2, records_per_site=192, seed=1), tok, 96)
    ts = TrainSettings(local_steps=16, batch_size=32)
    plan = DPStepPlan(sigma=1.2, q=32 / len(data), steps=16, max_grad_norm=1.0)
    start = adapter_state(model)

    def round_with(source_factory):
        def run():
            set_adapter_state(model, start)
            train_private(model, data, ts, plan, pad_id=tok.pad_id, randomness=source_factory(),
                          grad_sample_mode="ew")
        return run

    rounds = {"seeded": [], "os": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        rounds["seeded"].append(_median_s(round_with(lambda: SeededRandomness(3)), 1))
        rounds["os"].append(_median_s(round_with(SystemRandomness), 1))
    a, b = statistics.median(rounds["seeded"]), statistics.median(rounds["os"])
    print(f"{'DP round (16 steps)':>24} {a * 1000:>10.0f} {b * 1000:>13.0f} {b / a:>7.3f}")


if __name__ == "__main__":
    main()
