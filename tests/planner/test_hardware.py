"""Hardware specs: named recipes, detection (real on this machine, faked GPUs), margins."""

from types import SimpleNamespace

import pytest
import torch

from facli.errors import FacliError
from facli.models.recipe_loader import list_hardware_recipes
from facli.planner.hardware import (
    DEFAULT_MARGIN_FRACTION,
    MIB,
    GpuSpec,
    HardwareSpec,
    detect_hardware,
    hardware_from_option,
    load_hardware,
    resolve_margin,
)
from facli.units import GIB


@pytest.mark.parametrize("name", list_hardware_recipes())
def test_every_hardware_recipe_loads(name):
    spec = load_hardware(name)
    count = int(name.split("x")[0])
    assert spec.num_gpus == count and not spec.detected
    assert all(g.memory_bytes > g.reserved_bytes > 0 for g in spec.devices)
    assert spec.host_ram_bytes > 0 and spec.host_device_gbps > 0
    assert spec.cpu_attention_gbps <= spec.cpu_memory_gbps
    assert (spec.inter_gpu_gbps > 0) == (count > 1)
    assert spec.gpu_budget_bytes(0) < spec.devices[0].memory_bytes
    assert all(g.sms > 0 for g in spec.devices)


def test_h200_uses_the_measured_rates():
    spec = load_hardware("1xH200-141GB")
    gpu = spec.devices[0]
    assert (gpu.matmul_tflops, gpu.hbm_gbps, spec.host_device_gbps) == (787.0, 4200.0, 55.0)
    assert gpu.compute_capability == (9, 0) and gpu.supports_bf16


def test_v100_has_no_bf16():
    spec = load_hardware("8xV100-32GB")
    assert spec.num_gpus == 8 and not spec.devices[0].supports_bf16
    assert spec.devices[0].memory_bytes == 32510 * MIB


def test_unknown_hardware_lists_the_valid_names():
    with pytest.raises(FacliError) as error:
        load_hardware("3xTPU")
    assert "8xV100-32GB" in str(error.value) and "1xH200-141GB" in str(error.value)


@pytest.mark.parametrize("given", ["1xH200", "1xh200-141gb", "1XH200-141"])
def test_hardware_names_match_regardless_of_case_or_by_a_unique_prefix(given):
    assert load_hardware(given).name == "1xH200-141GB"


def test_an_ambiguous_prefix_names_its_matches():
    with pytest.raises(FacliError, match="got '8x', which begins 8xA100-80GB, 8xH200-141GB, "
                                         "8xV100-32GB; give more of the name"):
        load_hardware("8x")


@pytest.mark.parametrize(("text", "expected"), [
    (None, int(80 * GIB * DEFAULT_MARGIN_FRACTION)),
    ("2GiB", 2 * GIB), ("512MiB", 512 * MIB), ("512m", 512 * MIB), ("1.5", int(1.5 * GIB)),
    ("5%", 4 * GIB), (123, 123), ("0", 0),
], ids=lambda v: str(v))
def test_margin_forms(text, expected):
    assert resolve_margin(text, 80 * GIB) == expected


@pytest.mark.parametrize("text", ["lots", "-1g", "100%", "2 TB"])
def test_bad_margin_is_a_user_error(text):
    with pytest.raises(FacliError):
        resolve_margin(text, 80 * GIB)


def test_margin_shrinks_the_budget():
    loose = load_hardware("1xA100-80GB", margin="0")
    tight = load_hardware("1xA100-80GB", margin="4GiB")
    assert loose.gpu_budget_bytes(0) - tight.gpu_budget_bytes(0) == 4 * GIB
    assert tight.with_margin("0") == loose


def test_detect_without_gpus_plans_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = detect_hardware()
    assert spec.detected and spec.devices == () and spec.host_ram_bytes > 0
    assert spec.cpu_matmul_tflops > 0 and spec.cpu_memory_gbps > 0
    assert hardware_from_option("auto").devices == ()


def test_detect_reads_free_memory_and_matches_rates_by_name(monkeypatch):
    free = 100 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free - i * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=132))
    spec = detect_hardware(margin="1GiB")
    assert [g.memory_bytes for g in spec.devices] == [free, free - GIB]
    assert [g.sms for g in spec.devices] == [132, 132]
    assert all(g.reserved_bytes == 0 and g.matmul_tflops == 787.0 for g in spec.devices)
    assert spec.inter_gpu_gbps == load_hardware("2xH200-141GB").inter_gpu_gbps
    assert spec.gpu_budget_bytes(1) == free - 2 * GIB


def test_unknown_gpu_gets_conservative_rates(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Mystery GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=40))
    gpu = detect_hardware().devices[0]
    assert gpu.name == "Mystery GPU" and 0 < gpu.matmul_tflops < 100 and not gpu.supports_bf16


def test_specs_are_validated():
    with pytest.raises(FacliError):
        GpuSpec("x", 0, 0, 1.0, 1.0, (8, 0))
    gpu = GpuSpec("x", GIB, 0, 1.0, 1.0, (8, 0))
    with pytest.raises(FacliError, match="inter_gpu_gbps"):
        HardwareSpec("two", (gpu, gpu), GIB, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0)


def test_a_cpu_run_detects_no_gpu_and_never_touches_cuda(monkeypatch):
    """A CPU run must not initialize CUDA (on a GPU machine that would load the GPU stack, which
    may fail where a CPU run needs none of it)."""
    import torch

    from facli.run.placement import hardware_for
    from facli.summarize.planning import summarize_hardware

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU run asked CUDA")

    for name in ("is_available", "device_count", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    assert hardware_for(torch.device("cpu")).devices == ()
    assert summarize_hardware("cpu").devices == ()
