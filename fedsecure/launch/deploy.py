"""``fedsecure server`` and ``fedsecure client``: Flower's own SuperLink and SuperNode, launched with TLS,
SuperNode authentication and runtime dependency installation off (see ``shared/notes/flower-1.42.md`` §2).

Server: ``flower-superlink`` (TLS from the consortium CA, ``--enable-supernode-auth``, SQLite state under
the run directory), health check over HTTPS, ``flwr supernode register`` for every listed site key,
``flwr run`` of this project's ServerApp with the run directory in the run config, then progress from
``metrics.jsonl`` and refusals from the SuperLink's log until ``summary.json`` appears. SIGINT/SIGTERM
stop the Flower run and everything started; the run directory stays consistent (atomic adapter files,
a checkpoint after every round), and a restart with the same run directory resumes.

Client: ``flower-supernode`` with the CA certificate, the site's authentication key and its node config
(the site's own settings from site.yaml: name, data and state directories, privacy policy and limits,
storage, attestation provider; a 0600 TOML file in the state directory); it keeps running across
rounds and runs, and its refusals (wrong CA, unregistered key) are explained.
"""

from __future__ import annotations

import json
import logging
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsecure.errors import ConfigError, FedSecureError
from fedsecure.federation import site_events
from fedsecure.federation.keys import NODE_WORKER_SOCKET
from fedsecure.launch.deploy_config import CoordinatorConfig, SiteConfig, write_node_config
from fedsecure.launch.engines import (
    LogFollower,
    _bin,
    _stop,
    _toml_value,
    app_directory,
    failure_message,
    flower_env,
    run_config,
    run_status,
    wait_healthy,
)
from fedsecure.store.rundir import RunDir

log = logging.getLogger(__name__)

CONNECTION = "fedsecure"
#: SuperLink log fragments that mean a SuperNode was turned away, and what to tell the operator
REFUSALS = (
    ("No SuperNode found with the given public key", "a SuperNode with an unregistered key tried to join and was "
     "refused (HTTP 412 at activate-node). If it is a consortium site, add its auth.pub to server.sites"),
    ('" 401', "a SuperNode request failed authentication (HTTP 401: bad signature, clock skew or wrong node id) "
     "and was refused"),
    ("Invalid HTTP request", "a client spoke plain HTTP to the TLS port and was refused (SuperNodes must use TLS "
     "with the consortium CA)"),
)


class FinishedRunError(FedSecureError):
    """The run directory holds a run that already ended."""


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class Server:
    """One coordinator: a SuperLink plus one Flower run of fedsecure's ServerApp."""

    def __init__(self, dc: CoordinatorConfig, emit: Callable[[str], None] = print) -> None:
        self.dc, self.emit = dc, emit
        self.run_dir = dc.run_dir
        self.home = self.run_dir / "flwr-home"
        self.env = flower_env(self.home)
        self.superlink: subprocess.Popen | None = None
        self.run_id: str | None = None
        self.stopping = threading.Event()
        self.superlink_log = LogFollower(self.run_dir / "superlink.log")
        self.epsilons: dict[str, float] = {}

    # ------------------------------------------------------------------ steps
    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def prepare(self) -> Path:
        """Write Flower's connection config and the run config file; returns the run config file."""
        cfg = self.dc.federation  # checked when loaded (load_coordinator_config), the attestation policy too
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{_connect_host(self.dc.host)}:{self.dc.port}"\nroot-certificates = "{self.dc.tls_ca}"\n',
            encoding="utf-8")
        rc = run_config(cfg, self.run_dir)
        rc_file = self.home / "run-config.toml"
        rc_file.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in rc.items()), encoding="utf-8")
        return rc_file

    def start_superlink(self) -> None:
        """Start flower-superlink with TLS and SuperNode authentication; wait until it is healthy."""
        self.superlink_log = LogFollower(self.run_dir / "superlink.log")
        log_file = (self.run_dir / "superlink.log").open("ab")
        self.superlink = subprocess.Popen(
            [_bin("flower-superlink"), "--ssl-certfile", str(self.dc.tls_cert), "--ssl-keyfile", str(self.dc.tls_key),
             "--ssl-ca-certfile", str(self.dc.tls_ca), "--enable-supernode-auth",
             "--disable-runtime-dependency-installation", "--isolation", "subprocess",
             "--database", str(self.run_dir / "superlink.db"), "--host", self.dc.host, "--port", str(self.dc.port)],
            env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        wait_healthy(f"https://{_connect_host(self.dc.host)}:{self.dc.port}/health", self.superlink, timeout_s=60.0,
                     context=ssl.create_default_context(cafile=str(self.dc.tls_ca)),
                     fix="check that server.tls_cert names this host (fedsecure certs init --host ...) and see "
                         "superlink.log in the run directory")
        self.emit(f"SuperLink up on https://{self.dc.address} (TLS, SuperNode authentication on, "
                  "runtime dependency installation off)")

    def register_sites(self) -> None:
        """Register every site's SuperNode public key with the SuperLink."""
        for name, pub in self.dc.sites.items():
            out = self._flwr("supernode", "register", str(pub), CONNECTION, "--name", name, "--format", "json")
            text = out.stdout + out.stderr
            if out.returncode == 0 and '"success": true' in text:
                self.emit(f"registered site {name} ({pub.name})")
            elif "already" in text.lower() or "exists" in text.lower():
                self.emit(f"site {name} was already registered")
            else:
                raise FedSecureError(f"registering site {name} ({pub}) failed: {text.strip()[-400:]}. Fix: check "
                                     "that the file is the site's auth.pub (OpenSSH ECDSA public key)")

    def submit(self, rc_file: Path) -> str:
        """Submit fedsecure's ServerApp as a Flower run; returns the run id."""
        out = self._flwr("run", str(app_directory()), CONNECTION, "--run-config", str(rc_file), "--format", "json",
                         timeout=300)
        try:
            self.run_id = str(json.loads(out.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise FedSecureError(f"flwr run failed (exit {out.returncode}): {out.stdout[-400:]} {out.stderr[-400:]}") \
                from None
        self.emit(f"submitted Flower run {self.run_id}: {self.dc.federation.federation.rounds} rounds, "
                  f"{len(self.dc.sites)} sites")
        return self.run_id

    def status(self) -> str:
        """The Flower run's status (``flwr ls``)."""
        return run_status(self.env, CONNECTION, self.run_id)

    def follow(self, timeout_s: float, started: float) -> dict[str, Any]:
        """Stream progress and refusals until the run's summary appears; returns it."""
        metrics = LogFollower(self.run_dir / "metrics.jsonl")
        superlink_log = self.superlink_log
        summary = self.run_dir / "summary.json"
        deadline = time.monotonic() + timeout_s
        last_status = time.monotonic()
        while time.monotonic() < deadline and not self.stopping.is_set():
            for line in metrics.lines():
                self._progress(line)
            for line in superlink_log.lines():
                for needle, message in REFUSALS:
                    if needle in line:
                        self.emit(f"refused: {message}")
                        log.info("SuperLink: %s", line.strip()[:300])
            if summary.exists() and summary.stat().st_mtime >= started:
                for line in metrics.lines():
                    self._progress(line)
                return json.loads(summary.read_text())
            if time.monotonic() - last_status > 10:
                last_status = time.monotonic()
                status = self.status()
                if status.startswith("finished") and not summary.exists():
                    raise FedSecureError(failure_message(self.run_id, status, self.run_dir,
                                                         self.run_dir / "superlink.log", started))
            time.sleep(0.5)
        if self.stopping.is_set():
            raise KeyboardInterrupt
        raise FedSecureError(f"the run did not finish within {timeout_s:.0f} s")

    def _progress(self, line: str) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            return
        if rec.get("site") != "federation":
            if "epsilon" in rec:
                self.epsilons[str(rec["site"])] = float(rec["epsilon"])
            return
        loss = "n/a" if rec.get("eval_loss") is None else f"{rec['eval_loss']:.4f}"
        fails = "; ".join(f"{k}: {v}" for k, v in rec.get("failures", {}).items())
        eps = (", ε spent " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.epsilons.items()))
               if self.epsilons else "")
        self.emit(f"round {rec['round']}: held-out loss {loss}, {rec.get('sites_ok', 0)} sites, "
                  f"{rec.get('bytes_up', 0):,} B up{eps}, {rec.get('seconds', 0):.1f} s"
                  + (f" [{fails}]" if fails else ""))

    def stop(self) -> None:
        """Stop the Flower run and everything started for it."""
        if self.run_id is not None and self.superlink is not None and self.superlink.poll() is None:
            try:
                self._flwr("stop", str(self.run_id), CONNECTION, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.superlink is not None:
            _stop(self.superlink)
            self.superlink = None

    def check_not_finished(self) -> None:
        """Refuse a run directory whose run already ended: resuming it would append to a closed audit log and
        wait for sites that will not come. A new run needs a new run directory. Reads, never writes.
        """
        from fedsecure.federation.checkpoint import finished_run

        if not (self.run_dir / "summary.json").exists() and not (self.run_dir / "coordinator-state.json").exists():
            return
        why = finished_run(RunDir(self.run_dir))
        if why is not None:
            raise FinishedRunError(f"{why}; its report is {self.run_dir / 'summary.md'}")

    def run(self, timeout_s: float = 7 * 86400) -> dict[str, Any]:
        """Prepare, start, register, submit and follow; always stops what it started."""
        started = time.time() - 1
        self.check_not_finished()
        rc_file = self.prepare()
        try:
            self.start_superlink()
            self.register_sites()
            self.submit(rc_file)
            return self.follow(timeout_s, started)
        finally:
            self.stop()


def run_site(sc: SiteConfig, emit: Callable[[str], None] = print, stopping: threading.Event | None = None,
             retry_s: float = 10.0) -> int:
    """Run the site's SuperNode until ``stopping`` is set. A SuperNode that the coordinator refused (key not
    registered yet, coordinator down) is restarted after a growing pause; one that cannot trust the
    coordinator's certificate is not (that is a configuration error). Returns an exit code.
    """
    if sc.auth_key.stat().st_mode & 0o077:
        raise ConfigError(f"site.auth_key: {sc.auth_key} is readable by group or others. Fix: chmod 600 "
                          f"{sc.auth_key}")
    sc.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_config = dict(sc.node_config)
    home = sc.state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = sc.state_dir / "supernode.log"
    stopping = stopping or threading.Event()
    worker = None
    if sc.warm_worker:
        worker, socket_path = start_worker(sc, emit)
        node_config[NODE_WORKER_SOCKET] = str(socket_path)
    argv = [_bin("flower-supernode"), "--superlink", sc.superlink, "--root-certificates", str(sc.tls_ca),
            "--auth-supernode-private-key", str(sc.auth_key),
            "--node-config", str(write_node_config(sc.state_dir / "node-config.toml", node_config)),
            "--port", str(sc.runtime_port)]
    metrics = None
    try:
        if sc.metrics.enabled:  # the site's own endpoint, fed from its events (never by the ClientApp)
            from fedsecure.observe.site_metrics import SiteMetrics

            metrics = SiteMetrics(sc.name)
            metrics.restore(sc.state_dir / site_events.EVENTS)
            port = metrics.serve(sc.metrics.host, sc.metrics.port)
            emit(f"site {sc.name}: metrics on http://{sc.metrics.host}:{port}/metrics")
        return _supervise(sc, argv, home, log_path, emit, stopping, retry_s, metrics)
    finally:
        if metrics is not None:
            metrics.close()
        if worker is not None:
            _stop(worker)


def start_worker(sc: SiteConfig, emit: Callable[[str], None], timeout_s: float = 300.0):
    """Start the site's warm worker (fedsecure.federation.worker) and wait until it listens."""
    import tempfile

    sock_dir = sc.state_dir / "worker"
    if len(str(sock_dir / "worker.sock")) > 100:  # AF_UNIX paths are limited to ~108 bytes
        sock_dir = Path(tempfile.mkdtemp(prefix="fedsecure-worker-"))
    sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock_dir.chmod(0o700)
    path = sock_dir / "worker.sock"
    # only lines written from now on count: worker.log is appended to, and an earlier start's "ready"
    # line (with a socket file left behind by a killed worker) must not pass for this one
    ready = LogFollower(sc.state_dir / "worker.log", from_end=True)
    log_file = (sc.state_dir / "worker.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "fedsecure.federation.worker", "--socket", str(path)],
                            env=flower_env(sc.state_dir / "flwr-home"), stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log_file.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedSecureError(f"the site worker exited with code {proc.returncode} at start; see "
                                 f"{sc.state_dir / 'worker.log'}")
        if path.exists() and any(f"worker ready on {path}" in line for line in ready.lines()):
            emit(f"site {sc.name}: warm worker ready (model and accountant stay loaded between messages)")
            return proc, path
        time.sleep(0.2)
    _stop(proc)
    raise FedSecureError(f"the site worker did not start within {timeout_s:.0f} s")


def _supervise(sc: SiteConfig, argv: list[str], home: Path, log_path: Path, emit: Callable[[str], None],
               stopping: threading.Event, retry_s: float, metrics: Any = None) -> int:
    pause = retry_s
    events = LogFollower(sc.state_dir / site_events.EVENTS)  # what the site does with each message, from now on

    def progress() -> None:
        for line in events.lines():
            try:
                ev = json.loads(line)
                text = site_events.describe(sc.name, ev)
            except (ValueError, TypeError, AttributeError):
                continue
            if metrics is not None:
                metrics.observe(ev)
            if text:
                emit(text)

    while not stopping.is_set():
        follower = LogFollower(log_path)
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(argv, env=flower_env(home), stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        emit(f"site {sc.name}: SuperNode started (coordinator {sc.superlink}, TLS with {sc.tls_ca.name}, "
             f"authentication key {sc.auth_key.name}); log: {log_path}")
        verdict = None
        try:
            while proc.poll() is None and not stopping.is_set():
                for line in follower.lines():
                    verdict = _explain_site_line(sc, line, emit) or verdict
                progress()
                time.sleep(0.5)
            progress()
            for line in follower.lines():
                verdict = _explain_site_line(sc, line, emit) or verdict
        finally:
            if proc.poll() is None:
                _stop(proc)
        if stopping.is_set():
            return 0
        if verdict == "untrusted":
            return 3
        emit(f"site {sc.name}: SuperNode exited ({proc.returncode}); restarting in {pause:.0f} s")
        stopping.wait(pause)
        pause = min(pause * 2, 300.0)
    return 0


def _explain_site_line(sc: SiteConfig, line: str, emit: Callable[[str], None]) -> str | None:
    if "CERTIFICATE_VERIFY_FAILED" in line:
        emit(f"site {sc.name}: refused: the coordinator's TLS certificate is not signed by {sc.tls_ca} (another "
             "CA, or a man in the middle). Fix: get ca.pem from the consortium")
        return "untrusted"
    if "Failed to activate SuperNode" in line or "No SuperNode found with the given public key" in line:
        emit(f"site {sc.name}: refused: the coordinator does not know this site's key (yet). Fix: send auth.pub to "
             "the coordinator (server.sites)")
        return "unregistered"
    if "Exit Code" in line:
        emit(f"site {sc.name}: SuperNode stopped: {line.strip()}")
    return None


def install_signal_handlers(event: threading.Event) -> None:
    """SIGTERM sets ``event`` and interrupts the main thread (like Ctrl-C)."""
    def handler(signum, frame):  # noqa: ARG001
        if event.is_set():  # a second signal while stopping must not interrupt the clean-up of the first
            return
        event.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
