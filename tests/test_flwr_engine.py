"""Flower's own simulation engine (`flwr run` on a simulation SuperLink, Ray) runs the same apps."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from fedsecure.launch.simulate import simulate

from .conftest import global_adapter, small_config

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'fedsecure[ray]'")


ENGINE_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-serverapp", "raylet", "gcs_server",
                    "flwr-simulation")


def _flower_processes() -> set[str]:
    # running processes only: an exited child whose parent is gone may linger as a zombie (no
    # resources, nothing running) until the container's init reaps it
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return {" ".join(r) for r in rows
            if len(r) == 3 and not r[1].startswith("Z") and any(name in r[2] for name in ENGINE_PROCESSES)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flwr_run_and_inprocess_give_the_same_global_adapter(site_data, tmp_path, monkeypatch):
    from tests.net import guarded_env, outbound

    net = tmp_path / "net.jsonl"  # every process of the run records its lookups and connects here
    for k, v in guarded_env(net).items():
        monkeypatch.setenv(k, v)
    before = _flower_processes()
    cfg = small_config(site_data)
    simulate(cfg, run_dir=tmp_path / "inprocess")
    ray_cfg = small_config(site_data, federation={"engine": "ray"})
    said: list[str] = []
    rounds: list[int] = []
    summary = simulate(ray_cfg, run_dir=tmp_path / "ray", announce=said.append,
                       observer=lambda r: rounds.append(r["round"]))
    assert summary["rounds_completed"] == 1
    # the operator hears about the slow start-up and each round as it ends, not only at the end
    assert said[0].startswith("starting Flower's simulation engine") and said[1].startswith("submitted Flower run")
    assert rounds == [0, 1]
    a, b = global_adapter(tmp_path / "inprocess", 1), global_adapter(tmp_path / "ray", 1)
    assert a.keys() == b.keys()
    # Same seeds, same data, same apps: equal up to float reordering across thread counts.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # and training really happened (the update is not zero)
    init = global_adapter(tmp_path / "ray", 0)
    assert max(float(np.abs(b[k] - init[k]).max()) for k in b) > 1e-3
    # everything the engine started has been stopped
    assert _flower_processes() <= before
    # and nothing but loopback was contacted: no Flower telemetry, no Ray usage statistics, no hub
    assert outbound(net) == [], outbound(net)[:5]
