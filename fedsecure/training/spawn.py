"""The site worker's side of multi-process training: a pool of ranks that it starts, feeds one round at a time,
watches, and kills whole when one dies or a round runs out of time.

The ranks are processes started like torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` in the environment), each ``python -m fedsecure.training.ranks``, with the rendezvous store hosted
here (as torchrun's agent hosts it) on 127.0.0.1 only. They keep their process group and model between rounds (a
warm pool: the first round pays Python, torch and the model in each rank, the next ones do not). Each round's job
goes to every rank's stdin; the trained adapter comes back through a pipe that only rank 0 holds: nothing is
written to disk. Why processes of our own rather than ``torch.multiprocessing`` workers:

* the worker holds the ledger and talks to Flower; a rank that dies (out of memory, a driver fault) or hangs in a
  collective is killed and reaped without touching it;
* after an NCCL error a communicator cannot be trusted again (PyTorch tears the process down): on any failure the
  whole pool is killed, and the next round starts fresh ranks;
* nothing is pickled and no ``__main__`` is re-imported.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
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


def private_compression(training: SiteTraining) -> str:
    """What a DP round sends between ranks: ``bf16`` (rounded after the noise) or the exact float32 sum. PowerSGD
    projects each rank's partial sum of clipped gradients before the noise covers it (no per-record bound), so a
    site that allows it for its non-private rounds trains a private round with the exact sum instead: a run may
    always ask a site for more privacy.
    """
    return "bf16" if training.gradient_compression == "bf16" else "none"


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
    compression = private_compression(training) if job.plan is not None else training.gradient_compression
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // world)
    pool_header = {"backend": backend, "timeout_s": nccl.timeout_s, "model": to_dict(job.model), "threads": threads}
    header = {**pool_header, "data_dir": job.data_dir, "max_length": job.max_length, "train": to_dict(job.train),
              "plan": asdict(job.plan) if job.plan is not None else None, "seed": job.seed,
              "noise": _noise_spec(randomness, noise_seed) if job.plan is not None else {"kind": "none"},
              "grad_sample_mode": job.grad_sample_mode, "compression": compression}
    key = json.dumps([world, pool_header, nccl.environment()], sort_keys=True)
    pool = _POOLS.pop(key, None)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        while len(_POOLS) >= MAX_POOLS:  # the least recently used pool goes
            _POOLS.pop(next(iter(_POOLS))).close()
        pool = RankPool(world, nccl.environment(), nccl.timeout_s, threads)
    try:
        figures, state = pool.round([json.dumps(header).encode(), save(global_state)], training.round_timeout_s)
    except BaseException:
        pool.kill()  # a failed pool is never used again: the next round starts fresh ranks
        raise
    _POOLS[key] = pool
    fig = json.loads(figures)
    result = TrainResult(loss=float(fig["loss"]), steps=int(fig["steps"]), examples=int(fig["examples"]),
                         seconds=float(fig["seconds"]))
    return RankResult(state=dict(load(state)), result=result, noise_draws=[int(d) for d in fig["noise_draws"]])


#: the warm pools of this process, least recently used first (a deployed site's worker has one)
_POOLS: OrderedDict[str, RankPool] = OrderedDict()
MAX_POOLS = 2


def shutdown_pools() -> None:
    """Stop every warm pool of this process (its ranks exit when their stdin closes)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


atexit.register(shutdown_pools)


class RankPool:
    """``world`` ranks that keep their process group and model between rounds; killed whole on any failure."""

    def __init__(self, world: int, nccl_env: dict[str, str], timeout_s: float, threads: int) -> None:
        self.store = _free_store(world, timeout_s)
        env = {**os.environ, **nccl_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads), "FEDSECURE_WORKER_PID": str(os.getpid())}
        read_end, write_end = os.pipe()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.results = os.fdopen(read_end, "rb")
        try:
            for rank in range(world):
                self.logs.append(tempfile.TemporaryFile())
                extra = {"FEDSECURE_RESULT_FD": str(write_end)} if rank == 0 else {}
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fedsecure.training.ranks"], stdin=subprocess.PIPE, stdout=self.logs[-1],
                    stderr=self.logs[-1], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), **extra},
                    pass_fds=(write_end,) if rank == 0 else ()))
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(write_end)  # rank 0 holds the only other copy: its death ends our reads

    def alive(self) -> bool:
        """Whether every rank is still running (an idle pool whose rank died is replaced, not used)."""
        return all(p.poll() is None for p in self.procs)

    def round(self, frames: list[bytes], timeout_s: float) -> list[bytes]:
        """Send one job to every rank; rank 0's two frames, or RankFailure."""
        for p in self.procs:
            threading.Thread(target=_feed, args=(p, frames), daemon=True).start()
        answer: dict[str, Any] = {}
        reader = threading.Thread(target=_collect, args=(self.results, answer), daemon=True)
        reader.start()
        _watch(self.procs, self.logs, timeout_s, reader)
        if "frames" not in answer:  # rank 0's pipe closed: name the rank that died, if one did
            for _ in range(40):
                _check_exits(self.procs, self.logs)
                time.sleep(0.05)
            raise RankFailure(f"rank 0 ended without returning the trained adapter ({answer.get('error', 'no data')})"
                              "; nothing was released and no privacy was spent")
        return answer["frames"]

    def close(self) -> None:
        """Let the ranks finish (stdin closed), then make sure they are gone."""
        for p in self.procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Kill and reap every rank; release the pipe, the logs and the rendezvous store."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        for f in [*self.logs, self.results]:
            f.close()
        self.logs = []


def _feed(proc: subprocess.Popen, frames: list[bytes]) -> None:
    try:
        assert proc.stdin is not None
        write_frames(proc.stdin, *frames)
    except (BrokenPipeError, OSError, ValueError):
        pass  # the rank died first (or the pool was killed): the watcher reports it


def _collect(src: Any, answer: dict[str, Any]) -> None:
    try:
        answer["frames"] = read_frames(src, 2)
    except (ConnectionError, OSError, ValueError) as e:
        answer["error"] = str(e)


def _check_exits(procs: list[subprocess.Popen], logs: list[Any]) -> None:
    """RankFailure naming the first rank that exited (a rank of a pool never exits during a round)."""
    for rank, p in enumerate(procs):
        code = p.poll()
        if code is not None:
            _log_tail(rank, logs[rank])
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            raise RankFailure(f"site training failed: rank {rank} of {len(procs)} exited with {how}; the other "
                              "ranks were stopped, nothing was released and no privacy was spent. Fix: see the "
                              "site's log for the rank's last lines (out of memory, a driver or NCCL fault); "
                              "the next round starts fresh ranks")


def _watch(procs: list[subprocess.Popen], logs: list[Any], timeout_s: float, reader: threading.Thread) -> None:
    """Return when ``reader`` has rank 0's answer (or its pipe closed) with every rank alive; raise RankFailure
    on the first rank that exited, or at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while reader.is_alive():
        _check_exits(procs, logs)
        if time.monotonic() > deadline:
            for rank in range(len(procs)):
                _log_tail(rank, logs[rank])
            raise RankFailure(f"site training failed: the {len(procs)} ranks were still running after "
                              f"site.training.round_timeout_s = {timeout_s:g} s (a hung collective?); all were "
                              "stopped, nothing was released and no privacy was spent. Fix: check the interconnect "
                              "(fedsecure doctor) or raise the timeout")
        reader.join(timeout=0.05)


def _log_tail(rank: int, log_file: Any, lines: int = 20) -> None:
    """The rank's last lines go to the site's own log (never into the error sent to the coordinator)."""
    try:
        log_file.seek(0)
        tail = log_file.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    log.error("rank %d's last lines:\n%s", rank, "\n".join(tail))
