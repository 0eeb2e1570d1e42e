"""A stand-in for ``pynvml`` (nvidia-ml-py) with two GPUs: the same function names, argument orders, return types
and units as the real binding (bytes from GetName/GetUUID on older releases, structs with .gpu/.memory and
.used/.free/.total in bytes, power in mW, energy in mJ), and its exceptions for what a board does not support.
A test that drifts from the real API fails in test_hardware.py's check of these names against pynvml itself."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml

NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVMLError = pynvml.NVMLError
#: the functions of pynvml this fake stands in for (test_hardware checks each exists in the real module)
API = ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
       "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature",
       "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetCurrentClocksEventReasons"]


class FakeNvml:
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, energy_step_mj: int = 0, unsupported: tuple[str, ...] = ()) -> None:
        self.gpus = [
            {"name": b"NVIDIA H100 80GB HBM3", "uuid": b"GPU-aaaa-0000", "util": (87, 41),
             "mem": (80 * 2**30, 30 * 2**30, 50 * 2**30), "temp": 71, "power_mw": 612_345, "energy": 9_000_000,
             "reasons": 0x0},
            {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-bbbb-1111", "util": (3, 0),
             "mem": (80 * 2**30, 79 * 2**30, 1 * 2**30), "temp": 91, "power_mw": 95_000, "energy": 5_000_000,
             "reasons": 0x40 | 0x1},  # HwThermalSlowdown | GpuIdle
        ]
        self.energy_step_mj = energy_step_mj
        self.unsupported = set(unsupported)
        self.inits = 0

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        self.inits += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _check(self, fn: str) -> None:
        if fn in self.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetName(self, h: int):  # noqa: N802
        return self.gpus[h]["name"]

    def nvmlDeviceGetUUID(self, h: int):  # noqa: N802
        return self.gpus[h]["uuid"]

    def nvmlDeviceGetUtilizationRates(self, h: int):  # noqa: N802
        self._check("util")
        gpu, mem = self.gpus[h]["util"]
        return SimpleNamespace(gpu=gpu, memory=mem)

    def nvmlDeviceGetMemoryInfo(self, h: int, version=None):  # noqa: N802, ARG002
        total, used, free = self.gpus[h]["mem"]
        return SimpleNamespace(total=total, used=used, free=free)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        assert sensor == NVML_TEMPERATURE_GPU
        return self.gpus[h]["temp"]

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        return self.gpus[h]["power_mw"]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:  # noqa: N802
        self._check("energy")
        self.gpus[h]["energy"] += self.energy_step_mj
        return self.gpus[h]["energy"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:  # noqa: N802
        return self.gpus[h]["reasons"]
