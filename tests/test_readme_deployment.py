"""The README's deployment section, run as written: its commands are read from README.md itself (so the two
cannot drift) and run from a working directory that is not the configs' folder, for 2 sites and 1 round on
127.0.0.1. The only addition is ``--set federation.rounds=1`` on the server's command line (the README's
coordinator config asks for 3 rounds; the test needs one)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsecure.launch.engines import _stop

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent


def readme_deployment_commands() -> list[str]:
    """The fedsecure commands of the first bash block under "## Deployment", comments removed."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Deployment"):]
    section = section[:section.index("\n## ", 5)]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block, "README's Deployment section has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def test_the_readme_block_is_what_this_test_expects():
    cmds = readme_deployment_commands()
    kinds = [shlex.split(c)[1] for c in cmds]
    assert kinds == ["certs", "attest", "data", "server", "client", "client"], cmds
    assert all(c.startswith("fedsecure ") for c in cmds)


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT leftovers are fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_readme_deployment_section_runs_as_written(tmp_path):
    cmds = [shlex.split(c) for c in readme_deployment_commands()]
    busy = [p for p in (9093, 9094, 9095) if not _free(p)]
    if busy:
        pytest.skip(f"port(s) {busy} in use on this machine: the README's trial uses 9093-9095")
    cwd = tmp_path / "operator"  # the operator's working directory: not where the configs live
    cwd.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    for argv in cmds[:3]:  # certs, policy, data: one after the other
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{argv}: {out.stdout}{out.stderr}"
    deploy = cwd / "deploy"
    assert (deploy / "coordinator.yaml").is_file() and (deploy / "sites" / "hospital-b" / "site.yaml").is_file()

    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        with (tmp_path / f"{name}.out").open("wb") as f:
            procs[name] = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def output(name: str) -> str:
        return (tmp_path / f"{name}.out").read_text(errors="replace")

    try:
        start("server", [*cmds[3], "--set", "federation.rounds=1"])
        start("hospital-a", cmds[4])
        start("hospital-b", cmds[5])
        try:
            rc = procs["server"].wait(timeout=600)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not finish:\n{output('server')[-4000:]}") from None
        server = output("server")
        assert rc == 0, server[-4000:]
        assert "registered site hospital-a" in server and "registered site hospital-b" in server
        assert re.search(r"round 1: held-out loss \d+\.\d+, 2 sites", server), server[-4000:]
        assert "Attestation: 2/2 statements verified (software)" in server
        run_dir = deploy / "runs" / "consortium"
        assert (run_dir / "summary.json").is_file() and (run_dir / "privacy.md").is_file()

        # each site printed its own progress: the round it trained, ε spent of its budget, the end of the run
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all("last round" in output(s) for s in ("hospital-a", "hospital-b")):
            time.sleep(0.5)
        for site in ("hospital-a", "hospital-b"):
            text = output(site)
            assert re.search(rf"site {site}: run \S+ round 1/1: trained on \d+ records .*epsilon spent [\d.]+ of 3",
                             text), text
            assert "the run is finished on this site's side" in text, text

        # the same command again: the run is finished, nothing is appended, exit 2 with the way forward
        audit = (run_dir / "audit.log").read_bytes()
        again = subprocess.run([*cmds[3]], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2, again.stdout + again.stderr
        assert "holds a finished run" in again.stderr and "--run-dir" in again.stderr
        assert (run_dir / "audit.log").read_bytes() == audit
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _stop(proc)
