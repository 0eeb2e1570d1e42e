"""The machine part of ``fedsecure doctor``: what a site's hardware and interconnect will do to its training,
found before a run starts. Reads only: CPU affinity and NUMA nodes (``/sys/devices/system/node``), GPUs through
NVML (``nvidia-ml-py``: model, memory, power limit, temperature, ECC, NVLink and peer-to-peer between each pair),
RDMA devices from ``/sys/class/infiniband`` (ports, state, link layer, the GID type of each index), whether
``nvidia-peermem`` is loaded, the NCCL and torch versions, ``/dev/shm`` and the memlock limit.

Each finding is OK, WARN or FAIL (a blocker: the ranks would fail or hang). The findings end with the ``nccl:``
profile this machine should use. ``root`` and ``nvml`` exist so tests can give fake ``/sys`` trees and a fake
NVML; a machine without NVIDIA's driver is told "no GPU" and nothing fails.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure.launch.doctor import Check
from fedsecure.observe.hardware import Nvml, text

HOT_C = 85  # a GPU this hot throttles its clocks
CORES_PER_RANK = 4  # tokenising, collating, the optimizer and the noise draw (CPU float64) of one rank
MIN_SHM = 1 << 30  # NCCL's intra-node transport and the per-rank pinned buffers


@dataclass
class Machine:
    """What the doctor found, and the checks to print."""

    checks: list[Check] = field(default_factory=list)
    gpus: int = 0
    nvlink_all_pairs: bool = False
    rdma: list[dict[str, Any]] = field(default_factory=list)  # one per active port
    profile: str = "none"
    gid_index: int | None = None

    def add(self, status: str, name: str, detail: str) -> None:
        """One finding."""
        self.checks.append(Check(status, name, detail))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpus(m: Machine, root: Path) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    nodes = sorted(p.name for p in (root / "sys/devices/system/node").glob("node[0-9]*"))
    m.add("OK", "CPU", f"{cores} cores available to this process; {len(nodes) or 1} NUMA node(s)")
    return cores


def _gpus(m: Machine, nvml: Any) -> None:
    session = nvml if isinstance(nvml, Nvml) else Nvml(nvml)
    lib = session.lib()
    if lib is None:
        m.add("OK", "GPU", f"no GPU (NVML: {session.why or 'not available'}): the site trains on the CPU with gloo")
        return
    count = int(lib.nvmlDeviceGetCount())
    m.gpus = count
    if count == 0:
        m.add("OK", "GPU", "no GPU (NVML sees none): the site trains on the CPU with gloo")
        return
    handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    driver = session.read("nvmlSystemGetDriverVersion")
    for i, h in enumerate(handles):
        mem = session.read("nvmlDeviceGetMemoryInfo", h)
        power = session.read("nvmlDeviceGetEnforcedPowerLimit", h)
        temp = session.read("nvmlDeviceGetTemperature", h, lib.NVML_TEMPERATURE_GPU)
        ecc = session.read("nvmlDeviceGetEccMode", h)
        errors = session.read("nvmlDeviceGetTotalEccErrors", h, lib.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                       lib.NVML_VOLATILE_ECC)
        detail = (f"{text(lib.nvmlDeviceGetName(h))}, {mem.total / 2**30:.0f} GiB" if mem else
                  text(lib.nvmlDeviceGetName(h)))
        detail += f", power limit {power / 1000:.0f} W" if power is not None else ""
        detail += f", {temp} C" if temp is not None else ""
        detail += f", driver {text(driver)}" if driver and i == 0 else ""
        status = "OK"
        if temp is not None and temp >= HOT_C:
            status, detail = "WARN", detail + f": hot (>= {HOT_C} C), its clocks throttle and it slows every rank. " \
                                              "Fix: check its cooling and airflow before a run"
        if errors:
            status, detail = "FAIL", detail + f": {errors} uncorrected ECC error(s) since the driver loaded. Fix: " \
                                              "drain this GPU (reset it, or replace it if they recur)"
        elif ecc is not None and isinstance(ecc, (list, tuple)) and int(ecc[0]) != lib.NVML_FEATURE_ENABLED:
            status, detail = "WARN", detail + ": ECC is off (a memory error would silently corrupt training)"
        m.add(status, f"GPU {i}", detail)
    _links(m, session, handles)


def _links(m: Machine, session: Nvml, handles: list[Any]) -> None:
    if len(handles) < 2:
        return
    lib = session.lib()
    read = lib.NVML_P2P_CAPS_INDEX_READ
    read = read[0] if isinstance(read, tuple) else read  # nvidia-ml-py defines it as a 1-tuple
    nvlinks = []
    for h in handles:
        active = 0
        for link in range(int(getattr(lib, "NVML_NVLINK_MAX_LINKS", 18))):
            state = session.read("nvmlDeviceGetNvLinkState", h, link)
            if state is None:
                break
            active += int(state == lib.NVML_FEATURE_ENABLED)
        nvlinks.append(active)
    no_p2p = [(a, b) for a in range(len(handles)) for b in range(a + 1, len(handles))
              if session.read("nvmlDeviceGetP2PStatus", handles[a], handles[b], read) != lib.NVML_P2P_STATUS_OK]
    m.nvlink_all_pairs = all(n > 0 for n in nvlinks) and not no_p2p
    links = ", ".join(f"GPU {i}: {n}" for i, n in enumerate(nvlinks))
    if no_p2p:
        m.add("WARN", "GPU peer-to-peer", f"no P2P between {no_p2p[:4]}: all-reduce goes through host memory. "
                                          "Fix: check IOMMU/ACS settings, or the VM's GPU passthrough")
    else:
        m.add("OK", "GPU peer-to-peer", f"every pair; NVLink links active: {links}")


def _rdma(m: Machine, root: Path) -> None:
    base = root / "sys/class/infiniband"
    devices = sorted(base.iterdir()) if base.is_dir() else []
    if not devices:
        m.add("OK", "RDMA", "no RDMA device: NCCL uses NVLink/PCIe within this machine and TCP between machines")
        return
    for dev in devices:
        for port in sorted((dev / "ports").glob("*")):
            state = _read(port / "state") or "?"
            layer = _read(port / "link_layer") or "?"
            rate = _read(port / "rate") or "?"
            types = {}
            for t in sorted((port / "gid_attrs/types").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
                kind = _read(t)
                gid = _read(port / "gids" / t.name) or ""
                if kind and gid and gid.replace(":", "").strip("0"):
                    types[int(t.name)] = (kind, gid)
            name = f"RDMA {dev.name}:{port.name}"
            v4v2 = [i for i, (kind, gid) in types.items() if kind.lower() == "roce v2" and
                    gid.startswith("0000:0000:0000:0000:0000:ffff:")]
            gids = "; ".join(f"{i}: {kind}" for i, (kind, _) in types.items()) or "none"
            if "ACTIVE" not in state.upper():
                m.add("WARN", name, f"{layer}, {state}: not active. Fix: check its cable and the switch port")
                continue
            m.rdma.append({"device": dev.name, "port": port.name, "link_layer": layer, "roce_v2_ipv4": v4v2,
                           "gids": types})
            m.add("OK", name, f"{layer}, {state}, {rate}; GID types by index: {gids}")


def _peermem(m: Machine, root: Path) -> None:
    if not m.gpus or not m.rdma:
        return
    modules = _read(root / "proc/modules")
    loaded = (root / "sys/module/nvidia_peermem").is_dir() or (modules is not None and "nvidia_peermem" in modules)
    if loaded:
        m.add("OK", "nvidia-peermem", "loaded: GPUDirect RDMA is available")
    else:
        m.add("WARN", "nvidia-peermem", "not loaded: NCCL cannot use GPUDirect RDMA and stages every transfer "
                                        "through host memory. Fix: modprobe nvidia-peermem (and load it at boot)")


def _limits(m: Machine, shm: Path) -> None:
    try:
        st = os.statvfs(shm)
        size = st.f_frsize * st.f_blocks
    except OSError:
        size = 0
    if m.gpus > 1 and size < MIN_SHM:
        status = "FAIL" if size < 128 << 20 else "WARN"
        m.add(status, "/dev/shm", f"{size / 2**20:.0f} MiB: NCCL's shared-memory transport needs more (a container's "
                                  "default of 64 MiB makes it fail). Fix: docker run --shm-size=8g, or --ipc=host")
    else:
        m.add("OK", "/dev/shm", f"{size / 2**30:.1f} GiB")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if m.rdma and soft != resource.RLIM_INFINITY:
        m.add("WARN", "memlock", f"{soft / 2**20:.0f} MiB: RDMA registers (locks) large buffers. Fix: ulimit -l "
                                 "unlimited (docker: --ulimit memlock=-1 --cap-add IPC_LOCK)")
    else:
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:.0f} MiB"
        m.add("OK", "memlock", limit)


def _versions(m: Machine) -> None:
    import torch

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none in this build"
    m.add("OK", "versions", f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), NCCL {nccl}")


def _balance(m: Machine, cores: int) -> None:
    if not m.gpus:
        return
    per = cores / m.gpus
    if per < CORES_PER_RANK:
        m.add("WARN", "CPU per GPU", f"{cores} cores for {m.gpus} GPUs ({per:.1f} each): CPU-starved. Each rank "
                                     f"needs about {CORES_PER_RANK} (data, optimizer, and on rank 0 the DP noise, "
                                     "drawn on the CPU). Fix: fewer ranks (site.training.processes) or more cores")
    else:
        m.add("OK", "CPU per GPU", f"{per:.1f} cores per GPU")


def _recommend(m: Machine) -> None:
    roce = [p for p in m.rdma if p["link_layer"].lower() == "ethernet" and p["roce_v2_ipv4"]]
    ib = [p for p in m.rdma if p["link_layer"].lower() == "infiniband"]
    if m.gpus > 1 and m.nvlink_all_pairs:
        m.profile, why = "single-node-nvlink", "NVLink joins every GPU pair"
    elif ib:
        m.profile, why = "infiniband", f"InfiniBand port(s) active ({ib[0]['device']})"
    elif roce:
        m.gid_index = roce[0]["roce_v2_ipv4"][0]
        m.profile, why = "roce-v2", f"RoCE v2 on {roce[0]['device']}; its IPv4 RoCE v2 GID is index {m.gid_index}"
    elif m.gpus > 1:
        m.profile, why = "none", "GPUs without NVLink on one machine: NCCL's own detection (PCIe P2P)"
    else:
        m.profile, why = "none", "one GPU or none: no collective traffic worth tuning"
    m.add("OK", "recommended nccl.profile", f"{m.profile} ({why})")


def _against_site(m: Machine, site: Any) -> None:
    """The site's own settings against the machine: a rank per GPU, a RoCE GID index of the right type."""
    if site is None:
        return
    procs, nccl = site.training.processes, site.nccl
    if procs != "auto" and procs > 1 and m.gpus and procs > m.gpus:
        m.add("FAIL", "site.training.processes", f"{procs} ranks but {m.gpus} GPU(s): NCCL needs one GPU a rank. "
                                                 f"Fix: processes: auto (or {m.gpus})")
    gid = nccl.ib_gid_index if nccl.ib_gid_index is not None else (3 if nccl.profile == "roce-v2" else None)
    for port in m.rdma:
        if gid is None or port["link_layer"].lower() != "ethernet":
            continue
        kind = port["gids"].get(gid, ("none", ""))[0]
        if kind.lower() != "roce v2":
            good = port["roce_v2_ipv4"]
            m.add("FAIL", "site.nccl.ib_gid_index", f"index {gid} on {port['device']}:{port['port']} is {kind}, not "
                                                    "RoCE v2: NCCL would hang or fall back to TCP. Fix: ib_gid_index: "
                                                    f"{good[0] if good else '(no RoCE v2 IPv4 GID: configure one)'}")
    if site.nccl.profile != m.profile and (m.gpus > 1 or m.rdma):
        m.add("WARN", "site.nccl.profile", f"{site.nccl.profile}; this machine suggests {m.profile}")


def machine_checks(site: Any = None, *, root: Path = Path("/"), nvml: Any = None,
                   shm: Path = Path("/dev/shm")) -> Machine:
    """Every machine finding, with the recommended profile; ``site``: a SiteSettings to hold against it."""
    m = Machine()
    cores = _cpus(m, root)
    _gpus(m, nvml)
    _rdma(m, root)
    _peermem(m, root)
    _limits(m, shm)
    _versions(m)
    _balance(m, cores)
    _recommend(m)
    _against_site(m, site)
    return m
