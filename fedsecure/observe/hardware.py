"""GPU and CPU figures for the metrics endpoints, read when Prometheus scrapes.

GPUs through NVML (``nvidia-ml-py``), exported under the names, units and labels of NVIDIA's dcgm-exporter
(its ``default-counters.csv``): dashboards and alert rules written for dcgm-exporter work on a fedsecure
endpoint unchanged, and a site that already runs dcgm-exporter can turn these off without changing a rule.
CPU utilisation (``psutil``) sits next to GPU utilisation, so a data loader that starves the GPU shows.

A machine without NVIDIA's driver (this CI machine, a coordinator host) has no GPU series and says why once in
the log; nothing fails. A reading a GPU does not support (energy on an old board) leaves that one series out.
``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` keeps dcgm-exporter's name (no ``_total``), so it is exposed as a
gauge: ``increase()`` and ``rate()`` work on it as on dcgm-exporter's.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: dcgm-exporter name -> (help, GpuReading field)
DCGM_FIELDS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", "gpu_util"),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("Memory utilization (in %).", "mem_util"),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", "fb_used_mib"),
    "DCGM_FI_DEV_FB_FREE": ("Framebuffer memory free (in MiB).", "fb_free_mib"),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", "temp_c"),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", "power_w"),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("Total energy consumption since boot (in mJ).", "energy_mj"),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": ("Current clock throttle reasons (bitmask of NVML's "
                                           "nvmlClocksEventReason*).", "throttle"),
}
DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]
THERMAL_THROTTLE = 0x20 | 0x40  # nvmlClocksEventReasonSwThermalSlowdown | HwThermalSlowdown


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; None where the board does not report that figure."""

    index: int
    uuid: str
    name: str
    gpu_util: float | None = None
    mem_util: float | None = None
    fb_used_mib: float | None = None
    fb_free_mib: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    energy_mj: float | None = None
    throttle: float | None = None


def text(value: Any) -> str:
    """An NVML string (bytes on older releases) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """This process's NVML session, opened on first use (``lib``: an NVML module, ``pynvml`` by default)."""

    def __init__(self, lib: Any = None) -> None:
        self._lib, self._ready, self.why = lib, None, ""
        self._lock = threading.Lock()

    def lib(self) -> Any:
        """The initialised NVML module, or None (``why`` says why) where there is no driver or no binding."""
        with self._lock:
            if self._ready is None:
                try:
                    lib = self._lib if self._lib is not None else importlib.import_module("pynvml")
                    lib.nvmlInit()
                    self._lib, self._ready = lib, True
                except Exception as e:  # ImportError, NVMLError_LibraryNotFound/DriverNotLoaded, OSError
                    self._ready, self.why = False, f"{type(e).__name__}: {e}"
                    log.info("no GPU figures (NVML unavailable: %s)", self.why)
            return self._lib if self._ready else None

    def read(self, fn: str, *args: Any) -> Any:
        """``fn(*args)`` of the NVML module, or None where the board does not support it."""
        try:
            return getattr(self._lib, fn)(*args)
        except Exception:  # NVMLError_NotSupported and friends: that series is left out
            return None

    def visible(self) -> list[int]:
        """Indices of the GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), else all."""
        lib = self.lib()
        if lib is None:
            return []
        count = int(lib.nvmlDeviceGetCount())
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is None:
            return list(range(count))
        uuids = {text(self.read("nvmlDeviceGetUUID", lib.nvmlDeviceGetHandleByIndex(i))): i for i in range(count)}
        out = []
        for item in (x.strip() for x in env.split(",") if x.strip()):
            if item.isdigit() and int(item) < count:
                out.append(int(item))
            elif item.startswith(("GPU-", "MIG-")):
                out += [i for u, i in uuids.items() if u.startswith(item)]
            else:
                break  # CUDA stops at the first invalid entry
        return out

    def readings(self, indices: list[int] | None = None) -> list[GpuReading]:
        """Every GPU on the host (or ``indices``), now."""
        lib = self.lib()
        if lib is None:
            return []
        out = []
        for i in (range(int(lib.nvmlDeviceGetCount())) if indices is None else indices):
            h = lib.nvmlDeviceGetHandleByIndex(i)
            util, mem = self.read("nvmlDeviceGetUtilizationRates", h), self.read("nvmlDeviceGetMemoryInfo", h)
            power = self.read("nvmlDeviceGetPowerUsage", h)
            throttle = self.read("nvmlDeviceGetCurrentClocksEventReasons", h)
            if throttle is None:
                throttle = self.read("nvmlDeviceGetCurrentClocksThrottleReasons", h)
            out.append(GpuReading(
                index=i, uuid=text(self.read("nvmlDeviceGetUUID", h) or ""),
                name=text(self.read("nvmlDeviceGetName", h) or ""),
                gpu_util=None if util is None else float(util.gpu),
                mem_util=None if util is None else float(util.memory),
                fb_used_mib=None if mem is None else mem.used / 2**20,
                fb_free_mib=None if mem is None else mem.free / 2**20,
                temp_c=self.read("nvmlDeviceGetTemperature", h, getattr(lib, "NVML_TEMPERATURE_GPU", 0)),
                power_w=None if power is None else power / 1000.0,
                energy_mj=self.read("nvmlDeviceGetTotalEnergyConsumption", h),
                throttle=throttle))
        return out

    def energy_mj(self) -> float | None:
        """Energy the visible GPUs used since boot (mJ), or None where any of them cannot say."""
        lib, visible = self.lib(), self.visible()
        if lib is None or not visible:
            return None
        counters = [self.read("nvmlDeviceGetTotalEnergyConsumption", lib.nvmlDeviceGetHandleByIndex(i))
                    for i in visible]  # only the counter: this runs around every round's training
        return None if any(c is None for c in counters) else float(sum(counters))


_PROCESS_NVML = Nvml()


class EnergyMeter:
    """Energy the visible GPUs draw between :meth:`start` and :meth:`joules` (None without NVML energy)."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        self.nvml = nvml or _PROCESS_NVML
        self._start: float | None = None

    def start(self) -> EnergyMeter:
        """Read the counter now."""
        self._start = self.nvml.energy_mj()
        return self

    def joules(self) -> float | None:
        """Joules since :meth:`start`."""
        now = self.nvml.energy_mj()
        if self._start is None or now is None:
            return None
        return max(0.0, now - self._start) / 1000.0


class HardwareCollector(Collector):
    """A Prometheus collector: GPU series under dcgm-exporter's names, CPU utilisation, read at scrape time."""

    def __init__(self, nvml: Nvml | None = None) -> None:
        import psutil

        self.nvml = nvml or _PROCESS_NVML
        self._psutil = psutil
        psutil.cpu_percent(interval=None)  # the first call only starts the interval
        self.hostname = socket.gethostname()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One family per figure; a GPU series only where the board reports it."""
        cpu = GaugeMetricFamily("fedsecure_cpu_utilization_ratio", "Host CPU utilisation since the last scrape "
                                "(0-1, all cores), next to DCGM_FI_DEV_GPU_UTIL")
        cpu.add_metric([], self._psutil.cpu_percent(interval=None) / 100.0)
        yield cpu
        cores = GaugeMetricFamily("fedsecure_cpu_cores", "Logical CPU cores of the host")
        cores.add_metric([], float(self._psutil.cpu_count() or 0))
        yield cores
        readings = self.nvml.readings()
        for name, (help_text, field) in DCGM_FIELDS.items():
            fam = GaugeMetricFamily(name, help_text, labels=DCGM_LABELS)
            for r in readings:
                value = getattr(r, field)
                if value is not None:
                    fam.add_metric([str(r.index), r.uuid, f"nvidia{r.index}", r.name, self.hostname], float(value))
            if fam.samples:
                yield fam
