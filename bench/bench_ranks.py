"""A site's training over ranks: all-reduce bytes per step (DPDDP vs torch DDP under Opacus) and step time of 1 vs 2
ranks on the CPU (gloo), both as ratios against a baseline measured in the same run.

    .venv/bin/python bench/bench_ranks.py [--steps 6] [--batch 8] [--repeats 2]

1. **Bytes per step.** Two gloo ranks on 127.0.0.1 run the same DP-SGD steps on the tiny DeepSeek-V3 with LoRA
   (r = 8) four ways: torch's ``DistributedDataParallel`` under Opacus (DDP's reducer all-reduces the gradients
   in backward, then ``DistributedDPOptimizer`` all-reduces again: the baseline); Opacus' ``DPDDP`` with its
   optimizer as shipped (one all-reduce per tensor); fedsecure's (the same, in one bucket); and fedsecure's bf16
   option (the reduce-scatter in float32, the all-gather of the noised mean in bfloat16). "Handed in": the bytes
   each collective call is given (wrappers of ``torch.distributed``'s functions, which Opacus, fedsecure and DDP's
   registered ``allreduce_hook`` call). "On the wire": the loopback interface's counter over the steps (both
   ranks, TCP/IP headers included): gloo's own algorithms (its reduce-scatter is not a ring; NCCL's is).
2. **Step time.** The site's round (``plan.steps`` DP-SGD steps, σ = 1, q such that the expected batch is
   ``--batch``) in one process with every core, against ``site.training.processes: 2`` (each rank a core):
   the training time inside the ranks per step, the round's wall time once the ranks are warm, and their first
   round (start-up: Python, torch and the model in each rank). Baseline: one process.

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
    import warnings

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

    def counting(real_fn, tensor_arg: int):
        def call(*args, **kwargs):
            counted[0] += args[tensor_arg].numel() * args[tensor_arg].element_size()  # what this rank hands in
            return real_fn(*args, **kwargs)
        return call

    dist.all_reduce = counting(dist.all_reduce, 0)  # Opacus and DDP's allreduce_hook call torch.distributed's
    dist.reduce_scatter_tensor = counting(dist.reduce_scatter_tensor, 1)  # (output, input)
    dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor, 1)
    if mode == "ddp":
        wrapped = DDP(model)
        wrapped.register_comm_hook(None, allreduce_hook)  # DDP's own all-reduce, through the counted Python call
    else:
        wrapped = SiteDPDDP(model)
    gsm = wrap(wrapped, "hooks")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _dp_optimizer(params, TrainSettings(), DPStepPlan(1.0, 0.1, steps, 1.0), batch, SystemRandomness(),
                        distributed=True, compression="bf16" if mode == "bf16" else "none",
                        bucket=mode in ("dpddp", "bf16"))
    gen = torch.Generator().manual_seed(rank)
    batches = [collate([[1, *torch.randint(3, 1000, (30,), generator=gen).tolist(), 2] for _ in range(batch // world)],
                       0) for _ in range(steps + 1)]
    seconds = 0.0
    for i, b in enumerate(batches):  # the first step warms up (DDP builds its buckets) and is not counted
        if i == 1:
            dist.barrier()
            counted[0], wire, seconds = 0, _loopback_bytes(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        per_sequence_loss(out.logits, b["labels"]).mean().backward()
        opt.step()
    dist.barrier()
    seconds, wire = time.perf_counter() - seconds, _loopback_bytes() - wire
    if rank == 0:
        print(json.dumps({"bytes": counted[0] / steps, "wire": wire / steps, "ms": 1000 * seconds / steps,
                          "lora_bytes": sum(p.numel() * 4 for p in params), "tensors": len(params)}))
    dist.destroy_process_group()


def _loopback_bytes() -> int:
    """Bytes sent on the loopback interface so far (both ranks' traffic; TCP/IP headers included)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


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


def step_times(steps: int, batch: int, repeats: int, device: str = "cpu", world: int = 2) -> dict[str, list[float]]:
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
    ms = ModelSettings(preset="deepseek-v3-tiny", device=device, lora=LoraSettings(r=8, dropout=0.0))
    ts = TrainSettings(local_steps=steps, batch_size=batch)
    base, tok = load_model_and_tokenizer(ms)
    model = attach_lora(base, ms.lora)
    start = adapter_state(model)
    data = load_site(tmp / "site-0", tok, 64).train
    plan = DPStepPlan(sigma=1.0, q=batch / len(data), steps=steps, max_grad_norm=1.0)
    out: dict[str, list[float]] = {"one": [], "two": [], "two_wall": [], "one_wall": []}
    for _ in range(repeats + 1):  # the ranks' first round is their cold start (two_wall[0])
        torch.set_num_threads(os.cpu_count() or 1)
        t = time.perf_counter()
        r = train_private(model, data, ts, plan, pad_id=tok.pad_id, randomness=SystemRandomness())
        out["one_wall"].append(time.perf_counter() - t)
        out["one"].append(r.seconds / steps)
        t = time.perf_counter()
        rr = run_ranks(RankJob(model=ms, data_dir=str(tmp / "site-0"), max_length=64, train=ts, plan=plan, seed=1),
                       start, world=world, training=SiteTraining(processes=world), nccl=NcclSettings(),
                       randomness=SystemRandomness(), device=device)
        out["two_wall"].append(time.perf_counter() - t)
        out["two"].append(rr.result.seconds / steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU a rank (NCCL)")
    ap.add_argument("--world", type=int, default=2, help="ranks of the step-time part")
    ap.add_argument("--skip-bytes", action="store_true", help="only the step time (part 2)")
    ap.add_argument("--rank-bytes", choices=("ddp", "opacus", "dpddp", "bf16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_bytes:
        _rank_bytes(args.rank_bytes, args.steps, args.batch)
        return
    if not args.skip_bytes:
        print_bytes(args)
    t = step_times(args.steps, args.batch, args.repeats, args.device, args.world)
    one, two = statistics.median(t["one"]), statistics.median(t["two"])
    one_w, cold, two_w = statistics.median(t["one_wall"]), t["two_wall"][0], statistics.median(t["two_wall"][1:])
    where = f"{os.cpu_count()} cores" if args.device == "cpu" else f"{args.world} GPUs"
    print(f"DP-SGD step, expected batch {args.batch}, {where}, median of {args.repeats}:")
    print(f"  1 process (baseline): {one * 1000:8.1f} ms/step   round {one_w:6.2f} s")
    print(f"  {args.world} ranks:              {two * 1000:8.1f} ms/step   round {two_w:6.2f} s (warm)   "
          f"step ratio {two / one:.2f}x, round ratio {two_w / one_w:.2f}x")
    print(f"  {args.world} ranks' first round (their start-up: Python, torch, the model): {cold:6.2f} s, "
          f"{cold / one_w:.1f}x")


def print_bytes(args: argparse.Namespace) -> None:
    """Part 1."""
    runs = {mode: bytes_per_step(mode, args.steps, args.batch) for mode in ("ddp", "opacus", "dpddp", "bf16")}
    base = runs["ddp"]
    print(f"2 gloo ranks, DP-SGD on LoRA ({base['lora_bytes']:,} B of float32 gradients in {base['tensors']} tensors), "
          f"per step over {args.steps} steps:")
    print(f"  {'':44s} {'handed in':>13s} {'on the wire':>12s} {'ms/step':>8s}   ratios (bytes, wire, time)")
    names = {"ddp": "torch DDP + Opacus (baseline)", "opacus": "DPDDP, Opacus' per-tensor all-reduce",
             "dpddp": "DPDDP, one bucket (fedsecure)", "bf16": "DPDDP, bf16 after the noise (fedsecure)"}
    for mode, r in runs.items():
        print(f"  {names[mode]:44s} {r['bytes']:>13,.0f} {r['wire']:>12,.0f} {r['ms']:>8.1f}   "
              f"{r['bytes'] / base['bytes']:.2f}x {r['wire'] / base['wire']:.2f}x {r['ms'] / base['ms']:.2f}x")


if __name__ == "__main__":
    main()
