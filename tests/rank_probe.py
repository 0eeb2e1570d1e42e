"""One rank of the optimizer-level check in test_ranks.py: a small linear model, Opacus' per-sample gradients
over this rank's records, and fedsecure's distributed DP optimizer; rank 0 saves the gradient the optimizer
would apply (after clipping, the noise and the all-reduce). Run by the test as a subprocess, torchrun-style."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from opacus import GradSampleModule

from fedsecure.config import TrainSettings
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.training.dpsgd import _dp_optimizer
from fedsecure.training.ranks import SiteDPDDP, rank_randomness, shard


def problem(n: int = 10):
    """The same model and records on every rank (and in the test's one-process baseline)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x, y = torch.randn(n, 6, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def main() -> None:
    sigma, out = float(sys.argv[1]), sys.argv[2]
    compression = sys.argv[3] if len(sys.argv) > 3 else "none"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    model, x, y = problem()
    mine = shard(len(x), rank, world)
    gsm = GradSampleModule(SiteDPDDP(model), batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    plan = DPStepPlan(sigma=sigma, q=1.0, steps=1, max_grad_norm=0.5)
    opt = _dp_optimizer(params, TrainSettings(), plan, len(x) / world, rank_randomness({"kind": "seeded", "seed": 5},
                                                                                        rank), distributed=True,
                        compression=compression)
    torch.nn.functional.cross_entropy(gsm(x[mine]), y[mine]).backward()
    opt.pre_step()
    opt.reduce_gradients()
    np.save(f"{out}/rank{rank}.npy", torch.cat([p.grad.flatten() for p in params]).numpy())
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"draws": opt.draws}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
