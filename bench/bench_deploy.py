"""Deployment wall time: fedsecure (2 sites, 2 rounds, `fedsecure server` + 2 x `fedsecure client`) against
Flower's bare deployment of a trivial app (FedAvg over one 10-float array, same rounds), same run, same
machine, same transport security (TLS + SuperNode authentication) for both.

    .venv/bin/python bench/bench_deploy.py [--rounds 2]

Both are timed from the first process start to the end of the run (summary written / run finished),
on 127.0.0.1. The ratio is fedsecure / bare.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from fedsecure.data.synth import synthesize
from fedsecure.launch.certs import init as certs_init
from fedsecure.launch.engines import _stop, flower_env

BIN = Path(sys.executable).parent
TRIVIAL_SERVER = '''
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
import numpy as np

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=2, min_train_nodes=2,
                      min_evaluate_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(10, np.float32)]),
                   num_rounds=int(context.run_config["rounds"]), train_config=ConfigRecord())
    open(context.run_config["done-file"], "w").write("done")
'''
TRIVIAL_CLIENT = '''
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})}), reply_to=msg)
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare(root: Path, rounds: int) -> float:
    app = root / "trivial"
    (app / "trivial").mkdir(parents=True)
    (app / "trivial" / "__init__.py").write_text("")
    (app / "trivial" / "server_app.py").write_text(TRIVIAL_SERVER)
    (app / "trivial" / "client_app.py").write_text(TRIVIAL_CLIENT)
    (app / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        [project]
        name = "trivial"
        version = "1.0.0"
        dependencies = []
        [tool.hatch.build.targets.wheel]
        packages = ["."]
        [tool.flwr.app]
        publisher = "bench"
        [tool.flwr.app.components]
        serverapp = "trivial.server_app:app"
        clientapp = "trivial.client_app:app"
        [tool.flwr.app.config]
        rounds = {rounds}
        done-file = "{root / 'done'}"
        '''))
    certs_init(root / "certs", ["localhost", "127.0.0.1"], ["a", "b"])
    port, home = _port(), root / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "b"\n[superlink.b]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{root / "certs" / "ca.pem"}"\n')
    env, c = flower_env(home), root / "certs"
    procs = []
    t0 = time.perf_counter()
    try:
        log = (root / "superlink.log").open("wb")
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--ssl-certfile", str(c / "coordinator.pem"), "--ssl-keyfile",
             str(c / "coordinator.key"), "--ssl-ca-certfile", str(c / "ca.pem"), "--enable-supernode-auth",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(c / "ca.pem"))
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=ctx)
                break
            except OSError:
                time.sleep(0.2)
        for s in ("a", "b"):
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(c / "sites" / s / "auth.pub"), "b"],
                           env=env, check=True, capture_output=True)
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                 str(c / "ca.pem"), "--auth-supernode-private-key", str(c / "sites" / s / "auth.key"),
                 "--port", str(_port())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True))
        out = subprocess.run([str(BIN / "flwr"), "run", str(app), "b", "--format", "json"], env=env,
                             capture_output=True, text=True, check=True)
        json.loads(out.stdout)
        while not (root / "done").exists():
            time.sleep(0.2)
        return time.perf_counter() - t0
    finally:
        for p in procs:
            _stop(p)


def fedsecure(root: Path, rounds: int) -> float:
    certs_init(root / "certs", ["localhost", "127.0.0.1"], ["site-0", "site-1"])
    synthesize(root / "data", sites=2, records_per_site=40, eval_fraction=0.2, seed=7)
    subprocess.run([str(BIN / "fedsecure"), "attest", "dev-policy", "--out", str(root / "policy.yaml")], check=True,
                   capture_output=True)
    port = _port()
    server = {"run_dir": "run", "port": port, "tls_ca": "certs/ca.pem", "tls_cert": "certs/coordinator.pem",
              "tls_key": "certs/coordinator.key", "sites": {s: f"certs/sites/{s}/auth.pub" for s in ("site-0",
                                                                                                   "site-1")}}
    (root / "coordinator.yaml").write_text(yaml.safe_dump({
        "server": server, "seed": 3, "federation": {"rounds": rounds}, "data": {"max_length": 48},
        "train": {"local_steps": 2, "batch_size": 8}, "attestation": {"policy": "policy.yaml"}}))
    for i, s in enumerate(("site-0", "site-1")):
        (root / f"{s}.yaml").write_text(yaml.safe_dump({"site": {
            "name": s, "superlink": f"127.0.0.1:{port}", "tls_ca": "certs/ca.pem",
            "auth_key": f"certs/sites/{s}/auth.key", "data_dir": f"data/site-{i}", "state_dir": f"state/{s}",
            "runtime_port": _port(), "privacy": {"epsilon_budget": 3.0, "delta": 1e-5}}}))
    t0 = time.perf_counter()
    srv = subprocess.Popen([str(BIN / "fedsecure"), "server", "-c", "coordinator.yaml"], cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    sites = [subprocess.Popen([str(BIN / "fedsecure"), "client", "-c", f"{s}.yaml"], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
             for s in ("site-0", "site-1")]
    try:
        if srv.wait(timeout=1800) != 0:
            raise SystemExit("fedsecure server failed")
        return time.perf_counter() - t0
    finally:
        for p in sites:
            _stop(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        t_bare = bare(Path(a), args.rounds)
        print(f"Flower bare deployment, trivial app, 2 SuperNodes, {args.rounds} rounds (TLS + node auth): "
              f"{t_bare:.1f} s")
        t_fs = fedsecure(Path(b), args.rounds)
        print(f"fedsecure deployment, deepseek-v3-tiny, 2 sites, {args.rounds} rounds (TLS + node auth, DP, "
              f"attestation, sealing, codec): {t_fs:.1f} s")
    print(f"ratio fedsecure / bare: {t_fs / t_bare:.2f}x")


if __name__ == "__main__":
    main()
