"""The site worker's side of multi-process training: start the ranks for one round, watch them, collect rank 0's
result, and kill them all when one dies or the round runs out of time.

Why a fresh set of processes each round, started like torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` in the environment), rather than ``torch.multiprocessing`` workers kept warm:

* the worker holds the ledger and talks to Flower; a rank that dies (out of memory, a driver fault) or hangs in a
  collective is killed and reaped without touching it, and the next round starts clean;
* after an NCCL error a communicator cannot be trusted again (PyTorch tears the process down): fresh processes are
  the recovery;
* nothing is pickled and no ``__main__`` is re-imported: each rank is ``python -m fedsecure.training.ranks``, its job
  on stdin, and the rendezvous store is hosted here (as torchrun's agent hosts it) on 127.0.0.1 only.

The price is each rank loading the model every round: seconds for the presets; ``bench/bench_ranks.py`` measures
it. The trained adapter comes back through a pipe that only rank 0 holds: nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from fedsecure.config import ModelSettings, TrainSettings, to_dict
from fedsecure.config.parallel import NcclSettings, SiteTraining
from fedsecure.errors import FedSecureError
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.privacy.noise import Randomness, SeededRandomness
from fedsecure.training.local import TrainResult
from fedsecure.training.ranks import read_frames, write_frames

log = logging.getLogger(__name__)


class RankFailure(FedSecureError):
    """A rank died, hung past the round's time, or returned nothing: the round is failed, nothing was released."""


@dataclass(frozen=True)
class RankJob:
    """What every rank of one round needs (the site's data is read by each rank from ``data_dir``)."""

    model: ModelSettings
    data_dir: str
    max_length: int
    train: TrainSettings
    plan: DPStepPlan | None  # None: non-private training
    seed: int  # torch's seed (initialisation, dropout) and, non-private, the batch order
    grad_sample_mode: str = "hooks"
    compression: str = "none"


@dataclass(frozen=True)
class RankResult:
    """Rank 0's answer: the trained adapter, the figures, and how many noise tensors each rank drew."""

    state: dict[str, np.ndarray]
    result: TrainResult
    noise_draws: list[int]


def world_size(training: SiteTraining, device: str) -> int:
    """``training.processes`` as a number: ``auto`` is one rank per visible GPU when the model is on CUDA, else 1."""
    if training.processes != "auto":
        return int(training.processes)
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def backend_for(training: SiteTraining, device: str) -> str:
    """``training.backend``: auto is NCCL for a model on CUDA and gloo on the CPU."""
    import torch

    if training.backend != "auto":
        return training.backend
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def check_private_compression(training: SiteTraining) -> None:
    """Under DP the ranks' sum must be exact before the noise covers it: PowerSGD is refused, saying why (bf16 is
    taken, rounded after the noise: :func:`fedsecure.training.dpsgd._dp_optimizer`).
    """
    if training.gradient_compression != "powersgd":
        return
    raise FedSecureError(
        "site.training.gradient_compression = powersgd: refused for DP training. PowerSGD projects each rank's "
        "partial sum of clipped gradients onto a low-rank basis BEFORE the noise (added once, on rank 0) covers it, "
        "with an error-feedback memory of earlier steps; the error depends on the other records, so no per-record "
        "clipping bound holds after it and the accounted epsilon would be wrong. Fix: none or bf16 for private "
        "training (bf16 rounds after the noise); PowerSGD is allowed where the site trains without DP.")


def _noise_spec(randomness: Randomness, seed: int | None) -> dict[str, Any]:
    if isinstance(randomness, SeededRandomness):
        if seed is None:
            raise FedSecureError("a seeded noise source needs its seed to reach the ranks")
        return {"kind": "seeded", "seed": seed}
    return {"kind": "os"}


def _free_store(world: int, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def run_ranks(job: RankJob, global_state: dict[str, np.ndarray], *, world: int, training: SiteTraining,
              nccl: NcclSettings, randomness: Randomness, noise_seed: int | None = None, threads: int = 0,
              device: str = "cpu") -> RankResult:
    """Train one round in ``world`` ranks; raises :class:`RankFailure` (and leaves no process behind) when a rank
    dies, a rank hangs past ``training.round_timeout_s``, or rank 0 returns nothing.
    """
    from safetensors.numpy import load, save

    backend = backend_for(training, device)
    if job.plan is not None:
        check_private_compression(training)
    store = _free_store(world, nccl.timeout_s)
    cores = os.cpu_count() or 1
    header = {"backend": backend, "timeout_s": nccl.timeout_s, "model": to_dict(job.model), "data_dir": job.data_dir,
              "max_length": job.max_length, "train": to_dict(job.train),
              "plan": asdict(job.plan) if job.plan is not None else None, "seed": job.seed,
              "noise": _noise_spec(randomness, noise_seed) if job.plan is not None else {"kind": "none"},
              "grad_sample_mode": job.grad_sample_mode, "compression": job.compression,
              "threads": threads or max(1, cores // world)}
    job_bytes = [json.dumps(header).encode(), save(global_state)]
    env = {**os.environ, **nccl.environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(header["threads"]),
           "FEDSECURE_WORKER_PID": str(os.getpid())}
    read_end, write_end = os.pipe()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(world):
            err = tempfile.TemporaryFile()
            logs.append(err)
            extra = {"FEDSECURE_RESULT_FD": str(write_end)} if rank == 0 else {}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedsecure.training.ranks"], stdin=subprocess.PIPE, stdout=err, stderr=err,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), **extra},
                pass_fds=(write_end,) if rank == 0 else ()))
        os.close(write_end)
        write_end = -1
        for p in procs:
            threading.Thread(target=_feed, args=(p, job_bytes), daemon=True).start()
        answer: dict[str, Any] = {}
        reader = threading.Thread(target=_collect, args=(read_end, answer), daemon=True)
        reader.start()
        _watch(procs, logs, training.round_timeout_s)
        reader.join(timeout=30)
        if "error" in answer or "frames" not in answer:
            raise RankFailure(f"rank 0 ended without returning the trained adapter ({answer.get('error', 'no data')})"
                              "; nothing was released and no privacy was spent")
        figures, state = answer["frames"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if write_end >= 0:
            os.close(write_end)
        for f in logs:
            f.close()
        del store
    fig = json.loads(figures)
    result = TrainResult(loss=float(fig["loss"]), steps=int(fig["steps"]), examples=int(fig["examples"]),
                         seconds=float(fig["seconds"]))
    return RankResult(state=dict(load(state)), result=result, noise_draws=[int(d) for d in fig["noise_draws"]])


def _feed(proc: subprocess.Popen, frames: list[bytes]) -> None:
    try:
        assert proc.stdin is not None
        write_frames(proc.stdin, *frames)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the rank died first: the watcher reports it


def _collect(fd: int, answer: dict[str, Any]) -> None:
    with os.fdopen(fd, "rb") as src:
        try:
            answer["frames"] = read_frames(src, 2)
        except ConnectionError as e:
            answer["error"] = str(e)


def _watch(procs: list[subprocess.Popen], logs: list[Any], timeout_s: float) -> None:
    """Return when every rank exited 0; raise RankFailure on the first that did not, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                _log_tail(rank, logs[rank])
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                raise RankFailure(f"site training failed: rank {rank} of {len(procs)} exited with {how}; the other "
                                  "ranks were stopped, nothing was released and no privacy was spent. Fix: see the "
                                  "site's log for the rank's last lines (out of memory, a driver or NCCL fault); "
                                  "the next round starts fresh ranks")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            hung = [r for r, c in enumerate(codes) if c is None]
            for rank in hung:
                _log_tail(rank, logs[rank])
            raise RankFailure(f"site training failed: rank(s) {hung} of {len(procs)} still running after "
                              f"site.training.round_timeout_s = {timeout_s:g} s (a hung collective?); all were "
                              "stopped, nothing was released and no privacy was spent. Fix: check the interconnect "
                              "(fedsecure doctor) or raise the timeout")
        time.sleep(0.05)


def _log_tail(rank: int, log_file: Any, lines: int = 20) -> None:
    """The rank's last lines go to the site's own log (never into the error sent to the coordinator)."""
    try:
        log_file.seek(0)
        tail = log_file.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    log.error("rank %d's last lines:\n%s", rank, "\n".join(tail))
