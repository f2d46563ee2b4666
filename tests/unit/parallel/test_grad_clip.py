"""Global-norm clipping of plain gradients (the DTensor groups are covered by the distributed tests): the norm is
exact to ~1e-8 relative against fp64, also for large gradients, and clipping scales by max_norm / norm."""

from __future__ import annotations

import torch

from framework.parallel.grad_clip import clip_grad_norm_


def _params(*grads: torch.Tensor) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g, dtype=torch.float32))
        p.grad = g.clone()
        params.append(p)
    return params


def test_norm_of_large_gradients_matches_fp64() -> None:
    torch.manual_seed(0)
    # A whole-tensor fp32 norm of the 2M-element gradient is ~1e-6 off on CPU; the chunked one is ~1e-8.
    grads = [torch.randn(2_000_000) * 1e-2, torch.randn(8192, 32) * 1e-3, torch.randn(40, 30).t()]
    exact = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
    norm = clip_grad_norm_(_params(*grads), float("inf"))
    assert norm.dtype == torch.float32
    assert abs(float(norm) - exact) / exact < 1e-7


def test_clipping_scales_to_max_norm_and_skips_missing_grads() -> None:
    params = _params(torch.full((3, 4), 2.0), torch.full((5,), -1.0))
    params.append(torch.nn.Parameter(torch.ones(2)))  # no gradient: skipped
    norm = float(clip_grad_norm_(params, 1.0))
    assert abs(norm - (12 * 4 + 5) ** 0.5) < 1e-6
    clipped = sum(float(p.grad.double().pow(2).sum()) for p in params[:2]) ** 0.5
    assert abs(clipped - 1.0) < 1e-5
    assert params[2].grad is None
