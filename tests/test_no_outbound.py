"""Nothing leaves a hospital but the federation's own traffic: no telemetry, no hub, no update check.

Every Python process below runs with tests/netguard on its PYTHONPATH, whose audit hook records each name lookup
and connect attempt (before the closed network here could refuse it). The deployment and the Ray engine are
checked the same way inside their own tests (test_deployment.py, test_flwr_engine.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedsecure.launch.engines import flower_env
from tests.net import attempts, guarded_env, outbound

FEDSECURE = str(Path(sys.executable).with_name("fedsecure"))


def test_the_guard_sees_a_lookup_that_fails(tmp_path):
    """The check can fail: an outbound lookup is recorded even where the network refuses it."""
    log = tmp_path / "net.jsonl"
    code = "import socket\ntry:\n    socket.getaddrinfo('telemetry.flower.ai', 443)\nexcept OSError:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=guarded_env(log), check=True, timeout=60)
    assert [a["host"] for a in outbound(log)] == ["telemetry.flower.ai"]


def test_flowers_telemetry_is_off_in_every_process_we_start(tmp_path):
    env = flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    # importing fedsecure after Flower (a Flower process loading our app) switches the loaded flag off too
    code = ("import os; os.environ['FLWR_TELEMETRY_ENABLED'] = '1'\n"
            "import flwr.supercore.telemetry as t; assert t.FLWR_TELEMETRY_ENABLED == '1'\n"
            "import fedsecure; print(t.FLWR_TELEMETRY_ENABLED, os.environ['FLWR_TELEMETRY_ENABLED'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["0", "0"]


def test_a_flower_event_from_a_fedsecure_process_sends_nothing(tmp_path):
    """Flower's own event() is what SuperLink, SuperNode and flwr call at start: under fedsecure it stays silent."""
    log = tmp_path / "net.jsonl"
    code = ("import fedsecure\nfrom flwr.supercore.telemetry import EventType, event\n"
            "event(EventType.RUN_SUPERLINK_ENTER).result()\n")
    subprocess.run([sys.executable, "-c", code], env=guarded_env(log), check=True, timeout=120)
    assert outbound(log) == []
    # and without fedsecure the same call looks up Flower's telemetry service
    bare = tmp_path / "bare.jsonl"
    code = "from flwr.supercore.telemetry import EventType, event\nevent(EventType.RUN_SUPERLINK_ENTER).result()\n"
    env = guarded_env(bare)
    env["FLWR_TELEMETRY_ENABLED"] = "1"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert {a["host"] for a in outbound(bare)} == {"telemetry.flower.ai"}


def test_a_simulation_opens_nothing_but_loopback(tmp_path):
    log = tmp_path / "net.jsonl"
    res = subprocess.run([FEDSECURE, "simulate", "--sites", "2", "--rounds", "1", "--set", "train.local_steps=2",
                          "--set", "data.records_per_site=40", "--run-dir", str(tmp_path / "run")],
                         env=guarded_env(log), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert attempts(log) is not None
    assert outbound(log) == [], outbound(log)[:5]
