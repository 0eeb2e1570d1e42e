"""A site trained over several ranks (gloo on 127.0.0.1, the CPU twin of NCCL): the same sum, the noise drawn once
per step on rank 0, the same epsilon, and a dead or hung rank that fails only its own round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsecure.config import LoraSettings, ModelSettings, SiteSettings, TrainSettings
from fedsecure.config.parallel import NcclSettings, SiteTraining
from fedsecure.data.dataset import load_site
from fedsecure.errors import ConfigError
from fedsecure.launch.simulate import simulate
from fedsecure.model import adapter_state, attach_lora, load_model_and_tokenizer
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.privacy.noise import SeededRandomness, SystemRandomness
from fedsecure.training.dpsgd import _dp_optimizer, train_private
from fedsecure.training.spawn import RankFailure, RankJob, private_compression, run_ranks, shutdown_pools

from .conftest import site_ledger_entries, small_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fresh_pools():
    """Each test starts without warm ranks, and leaves none behind."""
    shutdown_pools()
    yield
    shutdown_pools()
MODEL = ModelSettings(preset="deepseek-v3-tiny", device="cpu", lora=LoraSettings(r=4, dropout=0.0))
TRAIN = TrainSettings(local_steps=3, batch_size=8, learning_rate=0.01)


# --------------------------------------------------------------------------- the optimizer: one exact sum, one draw
def _probe_ranks(sigma: float, out: Path, world: int = 2, compression: str = "none") -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    env = {**os.environ, "MASTER_PORT": str(store.port), "WORLD_SIZE": str(world),
           "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "rank_probe.py"), str(sigma), str(out), compression],
                              env={**env, "RANK": str(r)}) for r in range(world)]
    assert [p.wait(timeout=120) for p in procs] == [0] * world


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_two_ranks_apply_the_one_process_gradient_with_one_noise_draw(tmp_path, sigma):
    sys.path.insert(0, str(HERE))
    try:
        from rank_probe import problem
    finally:
        sys.path.remove(str(HERE))
    expected = _one_process_gradient(problem, sigma)
    _probe_ranks(sigma, tmp_path)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    draws = [json.loads((tmp_path / f"rank{r}.json").read_text())["draws"] for r in (0, 1)]
    # float32 sums of 5 + 5 clipped gradients against one sum of 10: the order of additions differs, ~1e-7 relative
    np.testing.assert_allclose(r0, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r0, r1)  # every rank applies the same all-reduced gradient
    assert draws == [4, 0]  # one noise tensor per parameter (2 weights, 2 biases), on rank 0 only
    if sigma:  # the noise is really there: the noiseless gradient is far from it
        assert np.abs(r0 - _one_process_gradient(problem, 0.0)).max() > 0.01


def test_bf16_between_ranks_rounds_the_noised_mean_only(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        from rank_probe import problem
    finally:
        sys.path.remove(str(HERE))
    expected = _one_process_gradient(problem, 1.3)  # float32, with rank 0's (seeded) noise
    _probe_ranks(1.3, tmp_path, compression="bf16")
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(r0, r1)
    as_bf16 = torch.from_numpy(r0).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(r0, as_bf16)  # what every rank applies is a bfloat16 value...
    rounded = torch.from_numpy(expected).to(torch.bfloat16).float().numpy()
    # ...the rounding of the noised float32 mean (noise added after a rounding would leave float32 values); the
    # float32 sums of the two ranks may differ from the one-process sum in the last bit, which can move a value
    # that sits on a rounding boundary by one bfloat16 step (2^-8 relative)
    assert np.mean(r0 == rounded) > 0.9
    np.testing.assert_allclose(r0, expected, rtol=2 ** -7, atol=1e-6)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["draws"] for r in (0, 1)] == [4, 0]


def _one_process_gradient(problem, sigma: float) -> np.ndarray:
    """The one-process site: all 10 records, Opacus' DPOptimizer, the same seeded noise source."""
    from opacus import GradSampleModule

    model, x, y = problem()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _dp_optimizer(params, TrainSettings(), DPStepPlan(sigma=sigma, q=1.0, steps=1, max_grad_norm=0.5), len(x),
                        SeededRandomness(5))
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    opt.pre_step()
    return torch.cat([p.grad.flatten() for p in params]).numpy()


# --------------------------------------------------------------------------- the site's ranks, end to end
def _one_process_update(site_data, settings: ModelSettings, randomness):
    """The one-process site's σ = 0 update on site-0 (q = 1, no dropout: the ranks see the same batches):
    (the adapter before, after, the result)."""
    base, tok = load_model_and_tokenizer(settings)
    model = attach_lora(base, settings.lora)
    start = adapter_state(model)
    data = load_site(site_data / "site-0", tok, 64).train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        result = train_private(model, data, TRAIN, DPStepPlan(0.0, 1.0, 3, 1.0), pad_id=tok.pad_id,
                               randomness=randomness)
    return start, adapter_state(model), result


@pytest.fixture(scope="module")
def one_process(site_data):
    """The one-process site's σ = 0 update on the CPU."""
    return _one_process_update(site_data, MODEL, SeededRandomness(5))


def _job(site_data, sigma: float) -> RankJob:
    return RankJob(model=MODEL, data_dir=str(site_data / "site-0"), max_length=64, train=TRAIN,
                   plan=DPStepPlan(sigma, 1.0, 3, 1.0), seed=11)


@pytest.mark.slow
def test_two_rank_site_without_noise_gives_the_one_process_update(site_data, one_process):
    start, trained, result = one_process
    # the site allows PowerSGD (for its non-private rounds): a private round sends the exact sum, so it is equal
    out = run_ranks(_job(site_data, 0.0), start, world=2,
                    training=SiteTraining(processes=2, gradient_compression="powersgd"), nccl=NcclSettings(),
                    randomness=SeededRandomness(5), noise_seed=5)
    update = max(float(np.abs(trained[k] - start[k]).max()) for k in start)
    # float32 reductions in another order (per rank, then the all-reduce), through 3 AdamW steps: the
    # difference stays ~1e-6 against updates of ~3e-2 (a lost or doubled record changes them by ~1e-3)
    for k in start:
        np.testing.assert_allclose(out.state[k], trained[k], atol=2e-5, rtol=0)
    assert update > 0.01
    assert out.result.examples == result.examples == 96 and out.result.steps == 3
    assert out.result.loss == pytest.approx(result.loss, rel=1e-5)  # the loss over both ranks' records


@pytest.mark.slow
def test_two_rank_private_site_draws_the_noise_once_per_step_on_rank_0(site_data, one_process):
    start, trained, _ = one_process
    out = run_ranks(_job(site_data, 1.0), start, world=2, training=SiteTraining(processes=2), nccl=NcclSettings(),
                    randomness=SystemRandomness())
    tensors = len(start)  # LoRA A and B of every adapted module: one noise tensor each, per step
    assert out.noise_draws == [3 * tensors, 0]
    assert max(float(np.abs(out.state[k] - trained[k]).max()) for k in start) > 1e-3  # the noise moved it


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "powersgd"])
def test_a_non_private_site_trains_in_ddp_ranks(site_data, one_process, compression):
    start, _, _ = one_process
    job = RankJob(model=MODEL, data_dir=str(site_data / "site-0"), max_length=64, train=TRAIN, plan=None, seed=11)
    out = run_ranks(job, start, world=2, training=SiteTraining(processes=2, gradient_compression=compression),
                    nccl=NcclSettings(), randomness=None)
    assert out.noise_draws == [0, 0] and out.result.steps == 3 and np.isfinite(out.result.loss)
    assert max(float(np.abs(out.state[k] - start[k]).max()) for k in start) > 1e-3


def _rank_pids(rank: int) -> list[int]:
    """This process's children that run rank ``rank`` of fedsecure.training.ranks."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != os.getpid() or b"fedsecure.training.ranks" not in (entry / "cmdline").read_bytes():
                continue
            if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _when_rank_appears(rank: int, action, after_s: float = 3.0) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = _rank_pids(rank)
            if pids:
                time.sleep(after_s)  # inside its model load or training
                for pid in pids:
                    action(pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_a_killed_rank_fails_the_round_cleanly_and_the_next_round_trains(site_data, one_process):
    start, _, _ = one_process
    killer = _when_rank_appears(1, lambda pid: os.kill(pid, signal.SIGKILL))
    with pytest.raises(RankFailure, match=r"rank 1 of 2 exited with signal SIGKILL.*nothing was released"):
        run_ranks(_job(site_data, 1.0), start, world=2, training=SiteTraining(processes=2), nccl=NcclSettings(),
                  randomness=SystemRandomness())
    killer.join()
    assert _rank_pids(0) == [] and _rank_pids(1) == []  # no rank left behind
    out = run_ranks(_job(site_data, 1.0), start, world=2, training=SiteTraining(processes=2), nccl=NcclSettings(),
                    randomness=SystemRandomness())
    assert out.result.steps == 3


@pytest.mark.slow
def test_ranks_stay_warm_between_rounds_and_a_dead_idle_rank_is_replaced(site_data, one_process):
    start, _, _ = one_process
    run = lambda: run_ranks(_job(site_data, 0.0), start, world=2, training=SiteTraining(processes=2),  # noqa: E731
                            nccl=NcclSettings(), randomness=SeededRandomness(5), noise_seed=5)
    began = time.monotonic()
    first = run()
    cold = time.monotonic() - began
    pids = _rank_pids(0) + _rank_pids(1)
    began = time.monotonic()
    second = run()
    warm = time.monotonic() - began
    assert _rank_pids(0) + _rank_pids(1) == pids and len(pids) == 2  # the same processes: no start-up
    assert warm < cold / 2, (warm, cold)
    assert second.noise_draws == first.noise_draws == [3 * len(start), 0]
    # nothing of the first round stays in the ranks: the second, from the same adapter and seeds, is the same
    assert all(np.array_equal(second.state[k], first.state[k]) for k in start)
    os.kill(_rank_pids(1)[0], signal.SIGKILL)  # an idle rank dies between rounds: the next round starts fresh ones
    time.sleep(0.5)
    third = run()
    assert third.result.steps == 3 and _rank_pids(0) != pids[:1]


@pytest.mark.slow
def test_the_least_recently_used_pool_is_stopped_and_ranks_die_with_their_worker(site_data, tmp_path, monkeypatch):
    from fedsecure.training import spawn

    start = _one_process_update(site_data, MODEL, SeededRandomness(5))[0]
    monkeypatch.setattr(spawn, "MAX_POOLS", 1)
    run = lambda threads: run_ranks(_job(site_data, 1.0), start, world=2,  # noqa: E731
                                    training=SiteTraining(processes=2), nccl=NcclSettings(),
                                    randomness=SystemRandomness(), threads=threads)
    run(1)
    first = _rank_pids(0) + _rank_pids(1)
    run(2)  # another pool (its ranks' thread count differs): the first one is stopped
    assert len(spawn._POOLS) == 1 and not set(first) & set(_rank_pids(0) + _rank_pids(1))
    shutdown_pools()
    # a worker that is killed (no atexit, no cleanup) takes its ranks with it
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "from fedsecure.config.parallel import NcclSettings, SiteTraining\n"
        "from fedsecure.privacy.noise import SystemRandomness\n"
        "from fedsecure.training.spawn import run_ranks\n"
        "import tests.test_ranks as t\n"
        "from pathlib import Path\n"
        f"data = Path({str(site_data)!r})\n"
        "start = t._one_process_update(data, t.MODEL, SystemRandomness())[0]\n"
        "run_ranks(t._job(data, 1.0), start, world=2, "
        "training=SiteTraining(processes=2), nccl=NcclSettings(), randomness=SystemRandomness())\n"
        "print('trained', flush=True)\n"
        "time.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert worker.stdout.readline().strip() == "trained"
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == worker.pid]
    assert len(ranks) == 2  # warm, idle
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while [pid for pid in ranks if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in ranks if _running(pid)] == []


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else -1


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed child nobody has reaped yet)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


@pytest.mark.slow
def test_a_hung_rank_fails_the_round_at_its_timeout(site_data, one_process):
    start, _, _ = one_process
    stopper = _when_rank_appears(1, lambda pid: os.kill(pid, signal.SIGSTOP), after_s=0.5)
    began = time.monotonic()
    with pytest.raises(RankFailure, match=r"the 2 ranks were still running after site.training."
                                          r"round_timeout_s = 10 s"):
        run_ranks(_job(site_data, 1.0), start, world=2, training=SiteTraining(processes=2, round_timeout_s=10),
                  nccl=NcclSettings(), randomness=SystemRandomness())
    stopper.join()
    assert time.monotonic() - began < 40
    assert _rank_pids(1) == []


def test_powersgd_is_never_used_for_dp_training():
    training = SiteTraining(processes=2, gradient_compression="powersgd")
    assert private_compression(training) == "none"  # a private round sends the exact sum (the test above trains it)
    assert private_compression(SiteTraining(gradient_compression="bf16")) == "bf16"  # rounded after the noise
    with pytest.raises(ConfigError, match="site.training.gradient_compression: must be none or bf16 where "
                                          "privacy.dp_required is true"):
        SiteSettings(training=training).validate()
    from fedsecure.config import SitePolicy

    SiteSettings(training=training, privacy=SitePolicy(dp_required=False)).validate()  # a non-private site may
    SiteSettings(training=SiteTraining(gradient_compression="bf16")).validate()  # bf16 rounds after the noise


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad, message", [
    ({"processes": 0}, "site.training.processes: must be auto or an integer in"),
    ({"processes": "two"}, "site.training.processes: must be auto"),
    ({"processes": True}, "site.training.processes"),
    ({"backend": "mpi"}, "site.training.backend: must be one of auto, gloo, nccl"),
    ({"round_timeout_s": 1}, "site.training.round_timeout_s: must be in"),
    ({"gradient_compression": "fp8"}, "site.training.gradient_compression: must be one of"),
])
def test_bad_training_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=message):
        SiteTraining(**bad).validate("site.training")


@pytest.mark.parametrize("bad, message", [
    ({"profile": "ethernet"}, "site.nccl.profile: must be one of none, single-node-nvlink, roce-v2"),
    ({"socket_ifname": "eth0; rm -rf /"}, "site.nccl.socket_ifname"),
    ({"ib_hca": "mlx5_0:x"}, "site.nccl.ib_hca"),
    ({"ib_gid_index": 256}, r"site.nccl.ib_gid_index: must be an integer in \[0, 255\]"),
    ({"ib_sl": 16}, r"site.nccl.ib_sl: must be an integer in \[0, 15\]"),
    ({"net_gdr_level": "NVL"}, "site.nccl.net_gdr_level"),
    ({"p2p_level": "FAR"}, "site.nccl.p2p_level"),
    ({"debug": "LOUD"}, "site.nccl.debug"),
    ({"async_error_handling": 7}, "site.nccl.async_error_handling"),
])
def test_bad_nccl_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=message):
        NcclSettings(**bad).validate("site.nccl")


def test_nccl_profile_and_explicit_keys_become_every_rank_environment():
    env = NcclSettings(profile="roce-v2", ib_gid_index=5, socket_ifname="^docker,lo", ib_hca="mlx5_0:1").environment()
    assert env["NCCL_IB_GID_INDEX"] == "5"  # the explicit key wins over the profile's 3
    assert env["NCCL_IB_TC"] == "106" and env["NCCL_NET_GDR_LEVEL"] == "PHB" and env["NCCL_IB_DISABLE"] == "0"
    assert env["NCCL_SOCKET_IFNAME"] == "^docker,lo" and env["NCCL_IB_HCA"] == "mlx5_0:1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["NCCL_DEBUG"] == "WARN"
    assert "NCCL_IB_GID_INDEX" not in NcclSettings(profile="tcp").environment()


def test_training_settings_travel_in_the_node_config_with_auto():
    site = SiteSettings(training=SiteTraining(processes="auto"), nccl=NcclSettings(profile="tcp", ib_tc=3))
    flat = site.to_flat()
    assert flat["site.training.processes"] == "auto" and flat["site.nccl.ib_tc"] == 3
    back = SiteSettings.from_flat(flat)
    assert back.training == site.training and back.nccl == site.nccl
    assert SiteSettings.from_flat({**flat, "site.training.processes": 4}).training.processes == 4


# --------------------------------------------------------------------------- the federation
@pytest.mark.slow
def test_a_federation_of_two_rank_sites_spends_the_one_process_epsilon(site_data, tmp_path):
    two = simulate(small_config(site_data, site={"training": {"processes": 2}}), run_dir=tmp_path / "two")
    one = simulate(small_config(site_data), run_dir=tmp_path / "one")
    assert two["rounds_completed"] == one["rounds_completed"] == 1
    for site in ("site-0", "site-1"):
        e2, e1 = site_ledger_entries(tmp_path / "two" / "sites" / site), site_ledger_entries(
            tmp_path / "one" / "sites" / site)
        assert [e["kind"] for e in e2] == [e["kind"] for e in e1]
        assert e2[-1]["epsilon_after"] == e1[-1]["epsilon_after"] > 0  # the same q, σ and steps: the same ε
    assert two["final_eval_loss"] < two["rounds"][0]["eval_loss"]


@pytest.mark.slow
def test_a_site_whose_rank_dies_fails_that_round_only_and_spends_nothing_for_it(site_data, tmp_path):
    cfg = small_config(site_data, federation={"sites": 2, "rounds": 2}, site={"training": {"processes": 2}})
    killer = _when_rank_appears(1, lambda pid: os.kill(pid, signal.SIGKILL), after_s=2.0)
    summary = simulate(cfg, run_dir=tmp_path / "run")
    killer.join()
    r1, r2 = summary["rounds"][1], summary["rounds"][2]
    assert r1["sites_ok"] == 1 and "exited with signal SIGKILL" in " ".join(r1["failures"].values())
    assert r2["sites_ok"] == 2 and summary["rounds_completed"] == 2
    failed = next(iter(r1["failures"]))
    entries = site_ledger_entries(tmp_path / "run" / "sites" / failed)
    # round 1: nothing spent, nothing released
    assert [(e["kind"], e["server_round"]) for e in entries] == [("spend", 2)]


# --------------------------------------------------------------------------- NCCL (a session lent GPUs runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: scripts/gpu_checks.sh runs this on a GPU")
def test_nccl_ranks_give_the_one_gpu_update_and_one_noise_draw_per_step(site_data):
    import dataclasses

    world = min(2, torch.cuda.device_count())  # one GPU: a 1-rank NCCL group still runs the whole path
    ms = dataclasses.replace(MODEL, device="cuda:0")
    start, trained, _ = _one_process_update(site_data, ms, SystemRandomness())
    job = dataclasses.replace(_job(site_data, 0.0), model=ms)
    out = run_ranks(job, start, world=world, training=SiteTraining(processes=world), nccl=NcclSettings(),
                    randomness=SystemRandomness(), device="cuda")
    for k in start:  # cuBLAS and NCCL reduce in their own orders: float32 rounding through 3 AdamW steps
        np.testing.assert_allclose(out.state[k], trained[k], atol=1e-4, rtol=0)
    noisy = run_ranks(dataclasses.replace(job, plan=DPStepPlan(1.0, 1.0, 3, 1.0)), start, world=world,
                      training=SiteTraining(processes=world, gradient_compression="bf16"), nccl=NcclSettings(),
                      randomness=SystemRandomness(), device="cuda")
    assert noisy.noise_draws == [3 * len(start)] + [0] * (world - 1)
