"""RMSNorm and SwiGLU with hand-written backwards: the same values and gradients as plain autograd (gradcheck in
fp64; fp32 to rounding), and fewer activations kept for the backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from framework.models.mlp import _SwiGLUFunction, swiglu
from framework.models.norms import RMSNorm, _RMSNormFunction, rms_norm_reference


def _kept_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_rms_norm_gradcheck_and_fp32_agreement() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))

    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(64))
    x = torch.randn(4, 32, 64, requires_grad=True)
    g = torch.randn(4, 32, 64)
    ref = rms_norm_reference(x, norm.weight, norm.eps)
    got = norm(x)
    assert torch.equal(got, ref)
    for a, b in zip(
        torch.autograd.grad(got, (x, norm.weight), g), torch.autograd.grad(ref, (x, norm.weight), g)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Kept: x and one value per row, against x and the normalised x.
    x_big, w_big = torch.randn(8, 128, 256, requires_grad=True), torch.ones(256, requires_grad=True)
    lean = _kept_bytes(lambda: _RMSNormFunction.apply(x_big, w_big, 1e-5))
    assert lean < 0.6 * _kept_bytes(lambda: rms_norm_reference(x_big, w_big, 1e-5))


def test_swiglu_gradcheck_and_fp32_agreement() -> None:
    torch.manual_seed(0)
    gate = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (gate, up))

    gate = torch.randn(64, 96, requires_grad=True)
    up = torch.randn(64, 96, requires_grad=True)
    g = torch.randn(64, 96)
    got, ref = swiglu(gate, up), F.silu(gate) * up
    assert torch.equal(got, ref)
    for a, b in zip(torch.autograd.grad(got, (gate, up), g), torch.autograd.grad(ref, (gate, up), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    kept = _kept_bytes(lambda: swiglu(gate, up))
    assert kept == 2 * gate.numel() * 4 < _kept_bytes(lambda: F.silu(gate) * up)
