"""Run the ServerApp and ClientApps of this package as one simulated federation.

Two engines run the *same* two app objects (``server.app:app``, ``client.app:app``):

* ``inprocess`` (default): :class:`~fedsecure.federation.inprocess.InProcessGrid`, one process,
  no network, starts in well under a second.
* ``ray``: Flower's own simulation engine. fedsecure starts a ``flower-superlink --simulation``
  on a free 127.0.0.1 port (runtime dependency installation off), submits the app with
  ``flwr run``, waits for the run to finish and stops what it started.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsecure.config import SimulationConfig
from fedsecure.errors import FedSecureError
from fedsecure.federation import keys
from fedsecure.federation.keys import SIMULATED_SITES

log = logging.getLogger(__name__)


class LogFollower:
    """Reads new lines of a file; remembers where it stopped."""

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self.path = path
        self.pos = path.stat().st_size if (from_end and path.exists()) else 0

    def lines(self) -> list[str]:
        """The complete lines written since the last call."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        return data[:cut].decode(errors="replace").splitlines()


def watch_rounds(metrics: Path, observer: Callable[[dict[str, Any]], None], stop: threading.Event,
                 every_s: float = 0.2) -> threading.Thread:
    """Call ``observer`` with every federation row appended to ``metrics`` (``metrics.jsonl``) until ``stop``
    is set, then with the rows written before that; the same for every engine (nothing global).
    """
    follower = LogFollower(metrics, from_end=False)

    def emit() -> None:
        for line in follower.lines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("site") == "federation":
                observer(row)

    def loop() -> None:
        while not stop.wait(every_s):
            emit()
        emit()

    thread = threading.Thread(target=loop, name="fedsecure-progress", daemon=True)
    thread.start()
    return thread


def node_configs(cfg: SimulationConfig, run_dir: str | Path) -> list[dict[str, Any]]:
    """One node config per simulated site: its own settings (``site.*``), as `fedsecure client` gives a
    deployed site's SuperNode, plus Flower's partition keys.
    """
    from fedsecure.data.dataset import site_dir

    n = cfg.federation.sites
    if not cfg.data.dir:
        raise FedSecureError("data.dir is not set. Fix: run through `fedsecure simulate`, which prepares the data.")
    sa = cfg.federation.secure_aggregation
    roster = sa.roster if sa.enabled else None  # simulate wrote it: every simulated site holds a copy
    return [{keys.PARTITION_ID: i, keys.NUM_PARTITIONS: n,
             **cfg.site.for_site(f"site-{i}", site_dir(cfg.data.dir, i), Path(run_dir).resolve(), roster).to_flat()}
            for i in range(n)]


def run_config(cfg: SimulationConfig, run_dir: Path) -> dict[str, bool | int | float | str]:
    """The Flower run config of ``cfg`` for the run directory ``run_dir``."""
    rc = cfg.to_run_config()
    rc["run-dir"] = str(Path(run_dir).resolve())
    return rc


def run_inprocess_engine(cfg: SimulationConfig, run_dir: Path) -> None:
    """Run the federation with the in-process grid (one process, no network)."""
    from client.app import app as client_app
    from fedsecure.federation.inprocess import run_inprocess
    from server.app import app as server_app

    # a fresh run id per run, as Flower's SuperLink gives (a site refuses a round of a run it already trained)
    run_inprocess(server_app, client_app, num_nodes=cfg.federation.sites, run_config=run_config(cfg, run_dir),
                  node_configs=node_configs(cfg, run_dir), run_id=secrets.randbits(62) + 1)


def app_directory() -> Path:
    """The Flower app directory (holding pyproject.toml with [tool.flwr.app]) of this checkout."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise FedSecureError("the ray engine submits this project as a Flower app and needs a source "
                             "checkout (pip install -e .). Fix: use --engine inprocess, or install editable.")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: bool | int | float | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run_flwr_engine(cfg: SimulationConfig, run_dir: Path, *, timeout_s: float = 1800.0,
                    poll: Callable[[], None] | None = None, emit: Callable[[str], None] | None = None) -> None:
    """Run through Flower's simulation engine (Ray); blocks until the run ends. ``emit`` gets a line for each
    start-up step (Ray takes tens of seconds before the first round).
    """
    emit = emit or (lambda line: None)
    import yaml

    from fedsecure._durable import atomic_write

    run_dir = Path(run_dir).resolve()
    started = time.time() - 1
    home = run_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / SIMULATED_SITES, yaml.safe_dump(cfg.to_dict()["site"], sort_keys=False).encode(),
                 mode=0o600)
    port = _free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        f"options.num-supernodes = {cfg.federation.sites}\n", encoding="utf-8")
    rc_file = home / "run-config.toml"
    rc_file.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config(cfg, run_dir).items()),
                       encoding="utf-8")
    env = ray_env(home)
    log_file = (run_dir / "flwr-superlink.log").open("wb")
    superlink = subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    emit(f"starting Flower's simulation engine: SuperLink on 127.0.0.1:{port}, {cfg.federation.sites} "
         f"SuperNodes on Ray (log: {run_dir / 'flwr-superlink.log'})")
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", superlink, timeout_s=60.0)
        out = subprocess.run([_bin("flwr"), "run", str(app_directory()), "sim", "--run-config", str(rc_file),
                              "--format", "json"], env=env, capture_output=True, text=True, timeout=300)
        try:
            run_id = json.loads(out.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError):
            raise FedSecureError(f"flwr run failed (exit {out.returncode}): {out.stdout[-500:]} "
                                 f"{out.stderr[-500:]}") from None
        emit(f"submitted Flower run {run_id}; Ray is starting the sites' workers (round 0 follows)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = run_status(env, "sim", run_id)
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise FedSecureError(failure_message(run_id, status, run_dir, run_dir / "flwr-superlink.log",
                                                         started))
                return
            if poll:
                poll()
            time.sleep(1.0)
        raise FedSecureError(f"Flower run {run_id} did not finish within {timeout_s:.0f} s")
    finally:
        _stop(superlink)
        log_file.close()


def failure_message(run_id: str | int | None, status: str, run_dir: Path, flower_log: Path, since: float) -> str:
    """Why a Flower run of the ServerApp failed: the coordinator's own error when it recorded one
    (:func:`~fedsecure.store.rundir.write_failure`), else a pointer to Flower's log.
    """
    from fedsecure.store.rundir import read_failure

    error = read_failure(run_dir, since)
    if error is not None:
        return f"the coordinator stopped: {error} (Flower run {run_id}: {status}; traceback in {flower_log})"
    return (f"Flower run {run_id} ended with status {status} before the coordinator wrote its summary; see "
            f"{flower_log}")


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower's processes: this installation's, with ``home`` as FLWR_HOME.

    Flower's processes spawn each other by name (flower-superexec, flwr-simulation, flwr-clientapp):
    this interpreter's bin directory goes first on PATH so they are this installation's. Runtime
    dependency installation, the update check and every library's telemetry are off (no network at run time).
    """
    from fedsecure import NO_PHONE_HOME
    from fedsecure.model.presets import ASSETS_ENV, installed_assets

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # a Flower app bundle carries only source and text files: the apps it runs find the shipped binary assets
    # (the pretrained base, checked against its pinned digest) in this installation
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", ASSETS_ENV: str(installed_assets()),
            **NO_PHONE_HOME}


def ray_env(home: Path) -> dict[str, str]:
    """:func:`flower_env` for the Ray engine, which Ray would otherwise use to look beyond this machine: its usage
    statistics off, its node address loopback (a one-machine simulation: no route lookup), and a HOME holding an
    (empty) ``ray_bootstrap_config.yaml``, without which Ray's dashboard probes the cloud metadata services
    (169.254.169.254, metadata.google.internal) even with usage statistics off (Ray 2.x, ``usage_stats_head.run``).
    """
    ray_home = home / "ray-home"
    ray_home.mkdir(parents=True, exist_ok=True)
    bootstrap = ray_home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        bootstrap.write_text("# fedsecure: present so that Ray does not probe cloud metadata services\n"
                             "provider: {type: local}\n", encoding="utf-8")
    return {**flower_env(home), "HOME": str(ray_home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, *, context: ssl.SSLContext | None = None,
                 fix: str = "see the SuperLink's log in the run directory") -> None:
    """Poll a SuperLink's health endpoint (HTTPS with ``context``) until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedSecureError(f"flower-superlink exited with code {proc.returncode} at start (port in use? "
                                 f"{fix})")
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context) as r:
                if r.status == 200:
                    return
        except ssl.SSLError as e:
            last = f"TLS: {e.reason or e}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise FedSecureError(f"the SuperLink did not become healthy at {url} within {timeout_s:.0f} s ({last}). "
                         f"Fix: {fix}")


def run_status(env: dict[str, str], connection: str, run_id: str | int) -> str:
    """A Flower run's status as ``flwr ls`` reports it (e.g. ``finished:completed``), or ``unknown``."""
    out = subprocess.run([_bin("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=60)
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def _descendants(root: int) -> set[int]:
    """PIDs of all processes below ``root`` (Linux /proc), whatever session they moved to."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the SuperLink and everything it started (SuperExec, ServerApp, Ray), and wait for them."""
    pids = _descendants(proc.pid) | {proc.pid}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if not any(_alive(p) for p in pids):
                return
            time.sleep(0.1)
    proc.poll()
