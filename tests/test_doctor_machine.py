"""``fedsecure doctor``'s machine checks on fake ``/sys`` trees and a fake NVML: RoCE with the wrong GID index,
nvidia-peermem missing, a hot GPU, a CPU-starved host, ECC errors, no P2P; and its real run on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pynvml
import pytest
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.config import SiteSettings
from fedsecure.config.parallel import NcclSettings, SiteTraining
from fedsecure.launch import machine
from fedsecure.launch.machine import machine_checks

runner = CliRunner()


class DoctorNvml:
    """pynvml's names, argument orders and units for what the doctor reads (checked against pynvml below)."""

    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_P2P_CAPS_INDEX_READ = pynvml.NVML_P2P_CAPS_INDEX_READ
    NVML_P2P_STATUS_OK = pynvml.NVML_P2P_STATUS_OK
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_NVLINK_MAX_LINKS = 18
    API = ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
           "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTemperature",
           "nvmlDeviceGetEccMode", "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetNvLinkState", "nvmlDeviceGetP2PStatus",
           "nvmlSystemGetDriverVersion"]

    def __init__(self, gpus: int = 2, temps: tuple[int, ...] = (60, 61), nvlinks: int = 4, p2p: bool = True,
                 ecc_errors: tuple[int, ...] = (0, 0)) -> None:
        self.n, self.temps, self.nvlinks, self.p2p, self.ecc_errors = gpus, temps, nvlinks, p2p, ecc_errors

    def nvmlInit(self):  # noqa: N802
        pass

    def nvmlDeviceGetCount(self):  # noqa: N802
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return i

    def nvmlDeviceGetName(self, h):  # noqa: N802
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802
        return type("M", (), {"total": 80 * 2**30, "used": 0, "free": 80 * 2**30})()

    def nvmlDeviceGetEnforcedPowerLimit(self, h):  # noqa: N802
        return 700_000  # mW

    def nvmlDeviceGetTemperature(self, h, sensor):  # noqa: N802
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self.temps[h]

    def nvmlDeviceGetEccMode(self, h):  # noqa: N802
        return [pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED]  # current, pending

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):  # noqa: N802
        return self.ecc_errors[h]

    def nvmlDeviceGetNvLinkState(self, h, link):  # noqa: N802
        if link >= self.NVML_NVLINK_MAX_LINKS:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED if link < self.nvlinks else 0

    def nvmlDeviceGetP2PStatus(self, a, b, index):  # noqa: N802
        return pynvml.NVML_P2P_STATUS_OK if self.p2p else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return "575.57.08"


def test_the_fake_nvml_names_exist_in_pynvml():
    assert [f for f in DoctorNvml.API if not callable(getattr(pynvml, f, None))] == []


def _sys_tree(root: Path, *, link_layer: str = "Ethernet", gids: dict[int, tuple[str, str]] | None = None,
              peermem: bool = False, state: str = "4: ACTIVE") -> Path:
    """A /sys with 2 NUMA nodes and one RDMA port whose GIDs are ``gids`` (index: (type, gid))."""
    for n in (0, 1):
        (root / f"sys/devices/system/node/node{n}").mkdir(parents=True)
    port = root / "sys/class/infiniband/mlx5_0/ports/1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs/types").mkdir(parents=True)
    (port / "state").write_text(state + "\n")
    (port / "link_layer").write_text(link_layer + "\n")
    (port / "rate").write_text("100 Gb/sec (4X EDR)\n")
    if gids is None:  # a RoCE NIC: index 0/1 the link-local address (v1, v2), 2/3 the IPv4 one (v1, v2)
        gids = {0: ("IB/RoCE v1", "fe80:0000:0000:0000:0a00:27ff:fe1e:0001"),
                1: ("RoCE v2", "fe80:0000:0000:0000:0a00:27ff:fe1e:0001"),
                2: ("IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:c0a8:0102"),
                3: ("RoCE v2", "0000:0000:0000:0000:0000:ffff:c0a8:0102")}
    for i in range(8):
        kind, gid = gids.get(i, ("", "0000:0000:0000:0000:0000:0000:0000:0000"))
        (port / "gids" / str(i)).write_text(gid + "\n")
        if kind:
            (port / "gid_attrs/types" / str(i)).write_text(kind + "\n")
    if peermem:
        (root / "sys/module/nvidia_peermem").mkdir(parents=True)
    return root


def _by_name(m):
    return {c.name: c for c in m.checks}


@pytest.fixture
def many_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))


def test_roce_with_the_wrong_gid_index_is_a_blocker_that_names_the_right_one(tmp_path, many_cores):
    # this NIC's IPv4 RoCE v2 GID is index 1 (its IPv4 v1 at 0): the profile's usual 3 is empty
    root = _sys_tree(tmp_path, gids={0: ("IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:0a00:0005"),
                                     1: ("RoCE v2", "0000:0000:0000:0000:0000:ffff:0a00:0005")}, peermem=True)
    site = SiteSettings(nccl=NcclSettings(profile="roce-v2"))
    m = machine_checks(site, root=root, nvml=DoctorNvml(nvlinks=0))
    found = _by_name(m)
    assert found["site.nccl.ib_gid_index"].status == "FAIL"
    assert "index 3 on mlx5_0:1 is none, not RoCE v2" in found["site.nccl.ib_gid_index"].detail
    assert "Fix: ib_gid_index: 1" in found["site.nccl.ib_gid_index"].detail
    assert m.profile == "roce-v2" and m.gid_index == 1
    assert "0: IB/RoCE v1; 1: RoCE v2" in found["RDMA mlx5_0:1"].detail
    # the right index passes
    ok = machine_checks(SiteSettings(nccl=NcclSettings(profile="roce-v2", ib_gid_index=1)), root=root,
                        nvml=DoctorNvml(nvlinks=0))
    assert "site.nccl.ib_gid_index" not in _by_name(ok) and not [c for c in ok.checks if c.status == "FAIL"]


def test_peermem_missing_is_named_with_its_fix(tmp_path, many_cores):
    m = machine_checks(root=_sys_tree(tmp_path), nvml=DoctorNvml(nvlinks=0))
    pm = _by_name(m)["nvidia-peermem"]
    assert pm.status == "WARN" and "modprobe nvidia-peermem" in pm.detail
    loaded = machine_checks(root=_sys_tree(tmp_path / "b", peermem=True), nvml=DoctorNvml(nvlinks=0))
    assert _by_name(loaded)["nvidia-peermem"].status == "OK"


def test_a_hot_gpu_and_ecc_errors_are_found_per_gpu(tmp_path, many_cores):
    m = machine_checks(root=tmp_path, nvml=DoctorNvml(temps=(60, 91)))
    found = _by_name(m)
    assert found["GPU 0"].status == "OK" and "700 W" in found["GPU 0"].detail
    assert found["GPU 1"].status == "WARN" and "91 C" in found["GPU 1"].detail and "throttle" in found["GPU 1"].detail
    broken = _by_name(machine_checks(root=tmp_path, nvml=DoctorNvml(ecc_errors=(0, 3))))
    assert broken["GPU 1"].status == "FAIL" and "3 uncorrected ECC error(s)" in broken["GPU 1"].detail


def test_a_cpu_starved_host_is_warned(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    found = _by_name(machine_checks(root=tmp_path, nvml=DoctorNvml(gpus=2)))
    assert found["CPU per GPU"].status == "WARN" and "3 cores for 2 GPUs (1.5 each): CPU-starved" in \
        found["CPU per GPU"].detail


def test_nvlink_recommends_its_profile_and_missing_p2p_is_warned(tmp_path, many_cores):
    m = machine_checks(root=tmp_path, nvml=DoctorNvml(nvlinks=4))
    assert m.profile == "single-node-nvlink" and "NVLink links active: GPU 0: 4, GPU 1: 4" in \
        _by_name(m)["GPU peer-to-peer"].detail
    m = machine_checks(root=tmp_path, nvml=DoctorNvml(nvlinks=0, p2p=False))
    assert _by_name(m)["GPU peer-to-peer"].status == "WARN" and m.profile == "none"


def test_more_ranks_than_gpus_is_a_blocker(tmp_path, many_cores):
    m = machine_checks(SiteSettings(training=SiteTraining(processes=4)), root=tmp_path, nvml=DoctorNvml(gpus=2))
    assert _by_name(m)["site.training.processes"].status == "FAIL"


def test_a_small_dev_shm_blocks_multi_gpu_training(tmp_path, many_cores, monkeypatch):
    real = os.statvfs
    monkeypatch.setattr(machine.os, "statvfs", lambda p: type("S", (), {"f_frsize": 4096, "f_blocks": 16384})()
                        if str(p) == "/dev/shm" else real(p))  # 64 MiB: a container's default
    found = _by_name(machine_checks(root=tmp_path, nvml=DoctorNvml()))
    assert found["/dev/shm"].status == "FAIL" and "--shm-size" in found["/dev/shm"].detail


def test_an_inactive_rdma_port_is_warned(tmp_path, many_cores):
    found = _by_name(machine_checks(root=_sys_tree(tmp_path, state="1: DOWN"), nvml=DoctorNvml()))
    assert found["RDMA mlx5_0:1"].status == "WARN" and "not active" in found["RDMA mlx5_0:1"].detail


def test_doctor_on_this_machine_says_no_gpu_and_json_exits_by_severity(monkeypatch):
    res = runner.invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    names = {c["name"]: c for c in doc["checks"]}
    assert {"CPU", "GPU", "RDMA", "/dev/shm", "memlock", "versions", "recommended nccl.profile"} <= set(names)
    if doc["nccl"]["gpus"] == 0:
        assert names["GPU"]["detail"].startswith("no GPU")
    assert doc["failed"] == 0
    # a blocker makes it exit 1
    monkeypatch.setattr(machine, "machine_checks", lambda site=None: machine.Machine(
        checks=[machine.Check("FAIL", "GPU 0", "3 uncorrected ECC error(s)")]))
    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 1 and "1 failed" in res.output
