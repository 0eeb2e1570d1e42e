"""A site's training over ranks: all-reduce bytes per step (DPDDP vs torch DDP under Opacus) and step time of 1 vs 2
ranks on the CPU (gloo), both as ratios against a baseline measured in the same run.

    .venv/bin/python bench/bench_ranks.py [--steps 6] [--batch 8] [--repeats 2]

1. **Bytes per step.** Two gloo ranks on 127.0.0.1 run the same DP-SGD steps on the tiny DeepSeek-V3 with LoRA
   (r = 8) two ways: fedsecure's path (Opacus' ``DPDDP`` + ``DistributedDPOptimizer``: one SUM all-reduce of the
   noised, clipped sum) and torch's ``DistributedDataParallel`` under Opacus (DDP's reducer all-reduces the
   gradients in backward, then ``DistributedDPOptimizer`` all-reduces again). Every byte handed to an all-reduce
   is counted by a wrapper of ``torch.distributed.all_reduce``, which both Opacus and DDP's ``allreduce_hook``
   (registered, so that DDP's buckets go through it) call. Baseline: the DDP form.
2. **Step time.** The site's round (``plan.steps`` DP-SGD steps, σ = 1, q such that the expected batch is
   ``--batch``) in one process with every core, against ``site.training.processes: 2`` (each rank a core):
   the training time inside the ranks per step, and the round's wall time with the ranks' start-up (a fresh
   Python, torch and the model per rank per round). Baseline: one process.

On 2 cores the ranks share the machine that the one process has alone, so the step ratio shows the overhead of
the distributed path (the extra all-reduce latency, per-rank Python), not a speed-up; on a site with one GPU per
rank, each rank brings its own accelerator. ``bench/gpu_check.sh`` runs the multi-GPU form.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rank_bytes(mode: str, steps: int, batch: int) -> None:
    """One rank of part 1 (run as a subprocess); rank 0 prints {"bytes": per step}."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fedsecure.config import LoraSettings, ModelSettings, TrainSettings
    from fedsecure.data.dataset import collate
    from fedsecure.model import attach_lora, load_model_and_tokenizer
    from fedsecure.privacy.guard import DPStepPlan
    from fedsecure.privacy.noise import SystemRandomness
    from fedsecure.training.dpsgd import _dp_optimizer, wrap
    from fedsecure.training.local import per_sequence_loss
    from fedsecure.training.ranks import SiteDPDDP

    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    ms = ModelSettings(preset="deepseek-v3-tiny", device="cpu", lora=LoraSettings(r=8))
    base, _ = load_model_and_tokenizer(ms)
    model = attach_lora(base, ms.lora)
    counted = [0]
    real = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counted[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # Opacus calls torch.distributed.all_reduce
    if mode == "ddp":
        wrapped = DDP(model)

        wrapped.register_comm_hook(None, allreduce_hook)  # DDP's own all-reduce, through the counted Python call
    else:
        wrapped = SiteDPDDP(model)
    gsm = wrap(wrapped, "hooks")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _dp_optimizer(params, TrainSettings(), DPStepPlan(1.0, 0.1, steps, 1.0), batch, SystemRandomness(),
                        distributed=True)
    gen = torch.Generator().manual_seed(rank)
    counted[0] = 0
    for _ in range(steps):
        seqs = [[1, *torch.randint(3, 1000, (30,), generator=gen).tolist(), 2] for _ in range(batch // world)]
        b = collate(seqs, 0)
        opt.zero_grad(set_to_none=True)
        out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        per_sequence_loss(out.logits, b["labels"]).mean().backward()
        opt.step()
    if rank == 0:
        print(json.dumps({"bytes": counted[0] / steps, "lora_bytes": sum(p.numel() * 4 for p in params)}))
    dist.destroy_process_group()


def bytes_per_step(mode: str, steps: int, batch: int) -> dict:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    env = {**os.environ, "MASTER_PORT": str(store.port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-bytes", mode, "--steps", str(steps), "--batch",
                               str(batch)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank of the {mode} run failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def step_times(steps: int, batch: int, repeats: int) -> dict[str, list[float]]:
    import torch

    from fedsecure.config import LoraSettings, ModelSettings, TrainSettings
    from fedsecure.config.parallel import NcclSettings, SiteTraining
    from fedsecure.data.dataset import load_site
    from fedsecure.data.synth import synthesize
    from fedsecure.model import adapter_state, attach_lora, load_model_and_tokenizer
    from fedsecure.privacy.guard import DPStepPlan
    from fedsecure.privacy.noise import SystemRandomness
    from fedsecure.training.dpsgd import train_private
    from fedsecure.training.spawn import RankJob, run_ranks

    tmp = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    synthesize(tmp, sites=1, records_per_site=200, eval_fraction=0.2, seed=3)
    ms = ModelSettings(preset="deepseek-v3-tiny", device="cpu", lora=LoraSettings(r=8, dropout=0.0))
    ts = TrainSettings(local_steps=steps, batch_size=batch)
    base, tok = load_model_and_tokenizer(ms)
    model = attach_lora(base, ms.lora)
    start = adapter_state(model)
    data = load_site(tmp / "site-0", tok, 64).train
    plan = DPStepPlan(sigma=1.0, q=batch / len(data), steps=steps, max_grad_norm=1.0)
    out: dict[str, list[float]] = {"one": [], "two": [], "two_wall": [], "one_wall": []}
    for _ in range(repeats):
        torch.set_num_threads(os.cpu_count() or 1)
        t = time.perf_counter()
        r = train_private(model, data, ts, plan, pad_id=tok.pad_id, randomness=SystemRandomness())
        out["one_wall"].append(time.perf_counter() - t)
        out["one"].append(r.seconds / steps)
        t = time.perf_counter()
        rr = run_ranks(RankJob(model=ms, data_dir=str(tmp / "site-0"), max_length=64, train=ts, plan=plan, seed=1),
                       start, world=2, training=SiteTraining(processes=2), nccl=NcclSettings(),
                       randomness=SystemRandomness())
        out["two_wall"].append(time.perf_counter() - t)
        out["two"].append(rr.result.seconds / steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rank-bytes", choices=("ddp", "dpddp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_bytes:
        _rank_bytes(args.rank_bytes, args.steps, args.batch)
        return
    ddp, dpddp = bytes_per_step("ddp", args.steps, args.batch), bytes_per_step("dpddp", args.steps, args.batch)
    print(f"all-reduce bytes per step (2 ranks, LoRA {dpddp['lora_bytes']:,} B of float32 gradients):")
    print(f"  DDP + Opacus (baseline): {ddp['bytes']:>12,.0f} B")
    print(f"  DPDDP (fedsecure):       {dpddp['bytes']:>12,.0f} B   ratio {dpddp['bytes'] / ddp['bytes']:.2f}x")
    t = step_times(args.steps, args.batch, args.repeats)
    one, two = statistics.median(t["one"]), statistics.median(t["two"])
    one_w, two_w = statistics.median(t["one_wall"]), statistics.median(t["two_wall"])
    print(f"DP-SGD step, expected batch {args.batch}, {os.cpu_count()} cores, median of {args.repeats}:")
    print(f"  1 process (baseline): {one * 1000:8.1f} ms/step   round {one_w:6.2f} s")
    print(f"  2 ranks (gloo):       {two * 1000:8.1f} ms/step   round {two_w:6.2f} s (start-up included)   "
          f"step ratio {two / one:.2f}x, round ratio {two_w / one_w:.2f}x")


if __name__ == "__main__":
    main()
