"""GPU figures under dcgm-exporter's names (NVML through a faithful stand-in; the real binding on this GPU-less
machine), CPU utilisation beside them, the energy a round draws."""

from __future__ import annotations

import inspect

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedsecure.observe.hardware import DCGM_FIELDS, EnergyMeter, HardwareCollector, Nvml

from .fake_nvml import API, FakeNvml


def _families(nvml: Nvml) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(HardwareCollector(nvml))
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_the_fake_speaks_the_real_bindings_api():
    for name in API:
        real, fake = getattr(pynvml, name), getattr(FakeNvml, name)
        real_params = [p for p in inspect.signature(real).parameters if p != "version"]
        fake_params = [p for p in inspect.signature(fake).parameters if p not in ("self", "version")]
        assert len(real_params) == len(fake_params), name


def test_gpu_series_carry_dcgm_names_units_and_labels():
    fams = _families(Nvml(FakeNvml()))
    assert set(DCGM_FIELDS) <= set(fams)

    def value(metric: str, gpu: str) -> float:
        [s] = [s for s in fams[metric] if s.labels["gpu"] == gpu]
        return s.value

    s0 = [s for s in fams["DCGM_FI_DEV_GPU_TEMP"] if s.labels["gpu"] == "0"][0]
    assert s0.labels["UUID"] == "GPU-aaaa-0000" and s0.labels["device"] == "nvidia0"
    assert s0.labels["modelName"] == "NVIDIA H100 80GB HBM3" and s0.labels["Hostname"]  # bytes decoded
    assert value("DCGM_FI_DEV_GPU_TEMP", "1") == 91
    assert value("DCGM_FI_DEV_GPU_UTIL", "0") == 87 and value("DCGM_FI_DEV_MEM_COPY_UTIL", "0") == 41
    assert value("DCGM_FI_DEV_POWER_USAGE", "0") == pytest.approx(612.345)  # NVML mW -> W
    assert value("DCGM_FI_DEV_FB_USED", "0") == 30 * 1024 and value("DCGM_FI_DEV_FB_FREE", "0") == 50 * 1024  # MiB
    assert value("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "1") == 5_000_000  # mJ, as dcgm-exporter
    assert value("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "1") == 0x41
    assert 0.0 <= fams["fedsecure_cpu_utilization_ratio"][0].value <= 1.0
    assert fams["fedsecure_cpu_cores"][0].value >= 1


def test_a_reading_the_board_does_not_support_is_left_out_not_zero():
    fams = _families(Nvml(FakeNvml(unsupported=("util", "energy"))))
    assert "DCGM_FI_DEV_GPU_UTIL" not in fams and "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" not in fams
    assert len(fams["DCGM_FI_DEV_GPU_TEMP"]) == 2
    assert EnergyMeter(Nvml(FakeNvml(unsupported=("energy",)))).start().joules() is None


def test_without_a_driver_only_cpu_figures_and_the_reason_once(caplog):
    nvml = Nvml()  # the real binding
    try:
        pynvml.nvmlInit()
        pytest.skip("an NVIDIA driver is present here: this test is for a machine without one")
    except pynvml.NVMLError:
        pass
    fams = _families(nvml)
    assert "fedsecure_cpu_utilization_ratio" in fams
    assert not any(name.startswith("DCGM_") for name in fams)
    assert "NVML" in nvml.why or "Library" in nvml.why
    assert EnergyMeter(nvml).start().joules() is None
    assert nvml.visible() == []


@pytest.mark.parametrize(("env", "expected"), [(None, [0, 1]), ("1", [1]), ("GPU-bbbb", [1]), ("", []),
                                               ("0,junk,1", [0])])
def test_energy_counts_the_gpus_cuda_lets_this_process_use(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    fake = FakeNvml(energy_step_mj=1500)
    nvml = Nvml(fake)
    assert nvml.visible() == expected
    meter = EnergyMeter(nvml).start()
    # each read of a GPU's counter advances it by 1.5 J in the fake: one more read per visible GPU
    assert meter.joules() == (pytest.approx(1.5 * len(expected)) if expected else None)
    assert fake.inits == 1  # NVML is initialised once per process, not per read


@pytest.mark.gpu
def test_real_nvml_reads_a_working_gpu_and_its_energy_while_it_computes():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: scripts/gpu_checks.sh runs this on a GPU machine")
    nvml = Nvml()
    assert nvml.lib() is not None, nvml.why
    fams = _families(nvml)
    for name in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL"):
        assert fams.get(name), f"{name} missing on {fams['DCGM_FI_DEV_GPU_TEMP'][0].labels['modelName']}"
    assert all(5 < s.value < 110 for s in fams["DCGM_FI_DEV_GPU_TEMP"])
    assert all(s.value > 0 for s in fams["DCGM_FI_DEV_POWER_USAGE"])
    meter = EnergyMeter(nvml).start()
    x = torch.randn(8192, 8192, device="cuda")
    for _ in range(200):
        x = torch.nn.functional.normalize(x @ x, dim=1)
    torch.cuda.synchronize()
    joules = meter.joules()
    if joules is not None:  # boards without the energy counter report None, never 0
        assert joules > 0
    used = _families(nvml)["DCGM_FI_DEV_FB_USED"]
    assert max(s.value for s in used) >= 256  # MiB: the 256 MiB matrix (and its products) is resident
