"""The GPU peak table behind MFU, checked against the dense peaks of NVIDIA's data sheets, by the names torch
reports (``torch.cuda.get_device_name``), without a GPU."""

from __future__ import annotations

import pytest
import torch

from framework.observe.mfu import PEAK_ENV, gpu_peak_tflops, mfu, peak_tflops

# name as torch reports it -> (bf16 dense, fp32 without TF32), TFLOP/s
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (989.0, 67.0),  # SXM5
    "NVIDIA H100 PCIe": (756.0, 51.0),
    "NVIDIA H100 NVL": (835.0, 60.0),
    "NVIDIA H200": (989.0, 67.0),  # SXM
    "NVIDIA H200 NVL": (835.0, 60.0),
    "NVIDIA GH200 480GB": (989.0, 67.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 19.5),
    "NVIDIA A100 80GB PCIe": (312.0, 19.5),
    "NVIDIA L40S": (362.0, 91.6),
    "NVIDIA A10": (125.0, 31.2),
}


@pytest.mark.parametrize("name", DATASHEET)
def test_known_gpus_have_their_dense_datasheet_peaks(name: str) -> None:
    bf16, fp32 = DATASHEET[name]
    assert gpu_peak_tflops(name, "bf16") == bf16
    assert gpu_peak_tflops(name, "fp32") == fp32


@pytest.mark.parametrize(
    "name", ["NVIDIA A10G", "NVIDIA L40", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""]
)
def test_gpus_not_in_the_table_have_no_peak_rather_than_a_neighbours(name: str) -> None:
    """ "A10" must not match the A10G, nor "L40S" the L40: their tensor-core peaks differ."""
    assert gpu_peak_tflops(name, "bf16") is None


def test_only_bf16_and_fp32_peaks_are_known() -> None:
    with pytest.raises(ValueError, match="bf16 and fp32"):
        gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_the_environment_overrides_the_table_on_any_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEAK_ENV, "123.5")
    assert peak_tflops(torch.device("cpu"), "bf16") == 123.5
    assert peak_tflops(torch.device("cpu"), "fp32") == 123.5


@pytest.mark.parametrize("value", ["fast", "0", "-5"])
def test_a_bad_override_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PEAK_ENV, value)
    with pytest.raises(
        ValueError, match=rf"^{PEAK_ENV}='{value}': expected the device's peak TFLOP/s"
    ) as info:
        peak_tflops(torch.device("cpu"), "bf16")
    assert "\n" not in str(info.value)


def test_a_cpu_has_no_peak_without_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(torch.device("cpu"), "bf16") is None


def test_mfu_is_achieved_over_peak_flops() -> None:
    # 6 * 1e9 FLOPs/token (a 1B model's training step) at 100k tokens/s on a 989 TFLOP/s GPU.
    assert mfu(6e9, 1e5, 989.0) == pytest.approx(6e14 / 989e12)
    assert mfu(6e9, 1e5, None) is None
