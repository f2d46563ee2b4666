"""Model FLOPs utilisation: achieved model FLOP/s over the device's peak, where the peak is known."""

from __future__ import annotations

import os

import torch

PEAK_ENV = "EXPERTRAIN_PEAK_TFLOPS"

# Dense peak TFLOP/s per GPU (no sparsity), by a substring of torch.cuda.get_device_name().
_CUDA_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Peak TFLOP/s of one device for ``dtype`` ('bf16' or 'fp32'): ``EXPERTRAIN_PEAK_TFLOPS`` if set, else a table
    of common GPUs. CPUs vary too much (AVX2 vs AVX-512 vs AMX) to guess: ``None`` there unless the variable is set."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in _CUDA_PEAKS.items():
        if key in name:
            return peaks[dtype]
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak * 1e12)
