"""Model FLOPs utilisation: achieved model FLOP/s over the device's peak, where the peak is known."""

from __future__ import annotations

import os
import re

import torch

PEAK_ENV = "EXPERTRAIN_PEAK_TFLOPS"

# Dense peak TFLOP/s per GPU (no 2:4 sparsity) from NVIDIA's data sheets: bf16 on tensor cores; fp32 on CUDA cores
# without TF32, which is what torch's default fp32 matmul (float32_matmul_precision "highest") uses. Matched
# against torch.cuda.get_device_name() as a whole word ("A10" is not "A10G" or "A100"), first match wins: the more
# specific variants come first ("H100 PCIe" before "H100").
_CUDA_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),  # SXM; torch names it "NVIDIA H200"
    ("GH200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM; torch names it "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
)


def gpu_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of the GPU torch calls ``device_name`` for ``dtype`` ('bf16' or 'fp32'); ``None`` for a
    GPU not in the table (set ``EXPERTRAIN_PEAK_TFLOPS`` for it)."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"peak FLOP/s are known for bf16 and fp32, not {dtype!r}")
    for key, peaks in _CUDA_PEAKS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return peaks[dtype]
    return None


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Peak TFLOP/s of one device for ``dtype`` ('bf16' or 'fp32'): ``EXPERTRAIN_PEAK_TFLOPS`` if set, else a table
    of common GPUs. CPUs vary too much (AVX2 vs AVX-512 vs AMX) to guess: ``None`` there unless the variable is set."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise ValueError(
                f"{PEAK_ENV}={override!r}: expected the device's peak TFLOP/s, a number > 0 (e.g. 989)"
            )
        return value
    if device.type != "cuda":
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_token * tokens/s`` over ``peak`` TFLOP/s (``None`` without a peak)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak * 1e12)
