"""One rank of a site's multi-process training: ``python -m fedsecure.training.ranks`` (started by
:mod:`fedsecure.training.spawn`, never by hand in a run).

Private training follows Opacus' distributed path: the PEFT model in ``DPDDP`` (rank 0's LoRA weights
broadcast to every rank), a ``GradSampleModule`` around it, and ``DistributedDPOptimizer``: each rank clips its
own records' gradients and sums them, **rank 0 alone adds the noise**, one SUM all-reduce combines them, and the
result is divided by the global expected batch. Sampling is Opacus' distributed Poisson scheme: the records are
split ``rank::world`` and each rank takes each of its own with probability q, so the union is a Poisson sample
of the whole set at rate q, the same mechanism the one-process site runs and the same accounting (q, σ, steps).
Unlike Opacus' ``DistributedUniformWithReplacementSampler``, a rank whose sample is empty still steps (with an
empty sum), so the ranks never fall out of step in their collectives.

Non-private training wraps the model in torch's ``DistributedDataParallel``, where a gradient compression hook
(bf16 or PowerSGD) may be used.

Each round's job arrives on stdin (a JSON header and the global adapter as safetensors); rank 0 writes the trained
adapter and the figures to the pipe named by ``FEDSECURE_RESULT_FD``. The process group and the model are kept
between rounds, until the worker closes stdin (or kills the ranks after a failure). Nothing touches the disk, the
ledger or Flower: the site's worker does that with what rank 0 returns.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from datetime import timedelta
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

from fedsecure.config import ModelSettings, TrainSettings, from_mapping
from fedsecure.data.dataset import TokenizedDataset, collate, load_site
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.privacy.noise import Randomness, SeededRandomness, SystemRandomness
from fedsecure.training.dpsgd import _dp_optimizer, dp_steps, mean_loss, unwrap, wrap
from fedsecure.training.local import (
    TrainResult,
    activation_checkpointing,
    per_sequence_loss,
    to_device,
    trainable_parameters,
)


def write_frames(out: BinaryIO, *frames: bytes) -> None:
    """Length-prefixed frames (8-byte big-endian length each)."""
    out.write(b"".join(struct.pack(">Q", len(f)) + f for f in frames))
    out.flush()


def read_frames(src: BinaryIO, count: int, limit: int = 1 << 34) -> list[bytes]:
    """``count`` frames written by :func:`write_frames`; ConnectionError if the stream ends early."""
    out = []
    for _ in range(count):
        head = src.read(8)
        if len(head) != 8:
            raise ConnectionError("the stream ended before a frame")
        (n,) = struct.unpack(">Q", head)
        if n > limit:
            raise ConnectionError(f"a frame of {n} bytes is over the {limit}-byte limit")
        body = src.read(n)
        if len(body) != n:
            raise ConnectionError("the stream ended inside a frame")
        out.append(body)
    return out


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's records of ``n``: ``rank, rank + world, ...`` (Opacus' distributed sampler's split)."""
    return list(range(rank, n, world))


def rank_randomness(spec: dict[str, Any], rank: int) -> Randomness:
    """The rank's source: the OS's secure generator, or (simulated sites only) a seed; rank 0 keeps the site's
    own seed, so a 1-rank run draws exactly what the one-process site draws.
    """
    if spec["kind"] == "seeded":
        seed = int(spec["seed"])
        return SeededRandomness(seed if rank == 0 else (seed * 1_000_003 + rank) & (2**63 - 1))
    return SystemRandomness()


class SiteDPDDP(DPDDP):
    """Opacus' ``DPDDP``, broadcasting only the trainable (LoRA) weights from rank 0: every rank builds the
    frozen base from the same checkpoint, and broadcasting a 16B base every round would cost minutes.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)  # not DPDDP.__init__, which broadcasts every parameter
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
        self.module = model


def train_private_rank(model: torch.nn.Module, data: TokenizedDataset, settings: TrainSettings, plan: DPStepPlan, *,
                       pad_id: int, randomness: Randomness, grad_sample_mode: str = "hooks",
                       compression: str = "none") -> tuple[TrainResult, list[int]]:
    """This rank's part of ``plan.steps`` DP-SGD steps; returns the result (the loss over all ranks' samples)
    and the noise tensors each rank drew (rank 0 draws them all).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    params = trainable_parameters(model)
    n = len(data)
    expected = max(1, round(plan.q * n))  # the site's expected batch: the one-process site's divisor
    if settings.gradient_checkpointing and grad_sample_mode != "hooks":
        raise ValueError("gradient checkpointing needs grad_sample_mode hooks")
    gsm = wrap(SiteDPDDP(model), grad_sample_mode)
    # DistributedDPOptimizer divides by expected_batch_size on each rank and by the world size after the
    # all-reduce: expected / world per rank makes the whole (sum of all ranks + noise) / expected.
    opt = _dp_optimizer(params, settings, plan, expected / world, randomness, distributed=True,
                        compression=compression)
    model.train()
    try:
        with activation_checkpointing(model, settings.gradient_checkpointing):
            per_step = dp_steps(gsm, opt, params, data, shard(n, rank, world), plan, randomness, pad_id=pad_id,
                                grad_sample_mode=grad_sample_mode)
    finally:
        unwrap(gsm, model)
        model.eval()
    return _gathered(per_step, opt.draws, start, n, plan.steps)


def train_local_rank(model: torch.nn.Module, data: TokenizedDataset, settings: TrainSettings, *, pad_id: int,
                     seed: int, compression: str = "none") -> TrainResult:
    """Non-private: ``settings.local_steps`` AdamW steps in torch DDP, each rank on its own records (batch
    ``batch_size / world``), gradients averaged by DDP, optionally through a compression hook.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    device = next(p for p in model.parameters() if p.requires_grad).device
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    register_compression(ddp, compression)
    mine = shard(len(data), rank, world)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    bs = max(1, min(-(-settings.batch_size // world), len(mine)))
    per_step = []
    model.train()
    with activation_checkpointing(model, settings.gradient_checkpointing):
        for _ in range(settings.local_steps):
            idx = [mine[i] for i in torch.randperm(len(mine), generator=gen)[:bs].tolist()]
            batch = to_device(collate([data[i] for i in idx], pad_id), model)
            opt.zero_grad(set_to_none=True)
            out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            per_seq = per_sequence_loss(out.logits, batch["labels"])
            per_seq.mean().backward()
            opt.step()
            per_step.append((float(per_seq.detach().sum()), len(idx)))
    model.eval()
    result, _ = _gathered(per_step, 0, start, len(data), settings.local_steps)
    return result


def register_compression(ddp: torch.nn.Module, compression: str) -> None:
    """bf16: each bucket all-reduced in bfloat16 (half the bytes); powersgd: rank-1 PowerSGD with error feedback
    (DDP keeps the hook's state).
    """
    if compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        ddp.register_comm_hook(None, bf16_compress_hook)
    elif compression == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def _gathered(per_step: list[tuple[float, int]], draws: int, start: float, n: int, steps: int
              ) -> tuple[TrainResult, list[int]]:
    """Every rank's per-step loss sums and counts, summed (one all-reduce at the end), and each rank's draws."""
    world = dist.get_world_size()
    sums = torch.tensor([[total, count] for total, count in per_step] or [[0.0, 0.0]], dtype=torch.float64)
    dist.all_reduce(sums)
    counts = torch.zeros(world, dtype=torch.int64)
    counts[dist.get_rank()] = draws
    dist.all_reduce(counts)
    loss = mean_loss([(float(t), int(c)) for t, c in sums.tolist()])
    return TrainResult(loss=loss, steps=steps, examples=n, seconds=time.perf_counter() - start), counts.tolist()


# ---------------------------------------------------------------------------- the rank's process
def _setup(header: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """Join the pool's process group and build the model once, on this rank's device before LoRA (Opacus #820)."""
    from fedsecure.model import attach_lora, load_model_and_tokenizer

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend, timeout = header["backend"], timedelta(seconds=float(header["timeout_s"]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    model_cfg = header["model"]
    if backend == "nccl" or (model_cfg.get("device", "auto") != "cpu" and torch.cuda.is_available()):
        torch.cuda.set_device(local)  # one GPU a rank
        model_cfg = {**model_cfg, "device": f"cuda:{local}"}
    if header["threads"]:
        torch.set_num_threads(int(header["threads"]))
    settings = from_mapping(ModelSettings, model_cfg, "model.")
    base, tokenizer = load_model_and_tokenizer(settings)
    return attach_lora(base, settings.lora), tokenizer


def _round(model: torch.nn.Module, tokenizer: Any, header: dict[str, Any], adapter: bytes
           ) -> tuple[dict[str, Any], bytes] | None:
    """One round on the kept model: the global adapter in, this rank's part trained, rank 0's answer out."""
    from safetensors.numpy import load, save

    from fedsecure.model import adapter_state, set_adapter_state

    rank, world = dist.get_rank(), dist.get_world_size()
    set_adapter_state(model, load(adapter))
    data = load_site(header["data_dir"], tokenizer, int(header["max_length"])).train
    train = from_mapping(TrainSettings, header["train"], "train.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(header["seed"]))
        if header["plan"] is not None:
            result, draws = train_private_rank(model, data, train, DPStepPlan(**header["plan"]),
                                               pad_id=tokenizer.pad_id,
                                               randomness=rank_randomness(header["noise"], rank),
                                               grad_sample_mode=header["grad_sample_mode"],
                                               compression=header["compression"])
        else:
            result = train_local_rank(model, data, train, pad_id=tokenizer.pad_id, seed=int(header["seed"]),
                                      compression=header["compression"])
            draws = [0] * world
    if rank != 0:
        return None
    figures = {"loss": result.loss, "steps": result.steps, "examples": result.examples,
               "seconds": result.seconds, "noise_draws": draws, "world": world}
    return figures, save(adapter_state(model))


def _die_with_worker() -> None:
    """A rank never outlives the worker that started it (Linux: PR_SET_PDEATHSIG, then a check for a worker that
    died before it was set). Done here, not between fork and exec, where the worker's threads make it unsafe.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get("FEDSECURE_WORKER_PID", str(os.getppid())):
        os._exit(1)


def main() -> None:
    """Serve rounds until the worker closes stdin: each job (a JSON header and the global adapter) is trained,
    and rank 0 writes the result to its pipe. The process group and the model are kept between rounds.
    """
    _die_with_worker()
    sink = os.fdopen(int(os.environ["FEDSECURE_RESULT_FD"]), "wb") if "FEDSECURE_RESULT_FD" in os.environ else None
    model = tokenizer = None
    try:
        while True:
            try:
                header_bytes, adapter = read_frames(sys.stdin.buffer, 2)
            except ConnectionError:  # stdin closed: the worker is done with this pool
                return
            header = json.loads(header_bytes)
            if model is None:
                model, tokenizer = _setup(header)
            out = _round(model, tokenizer, header, adapter)
            if out is not None and sink is not None:
                write_frames(sink, json.dumps(out[0]).encode(), out[1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
