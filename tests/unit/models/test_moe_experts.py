"""Every experts kernel computes the same function and gradients, including empty and overloaded experts."""

from __future__ import annotations

import pytest
import torch

from framework.models.moe.experts import EXPERT_IMPLS, GroupedExperts, resolve_impl

E, D, H = 4, 16, 24


def _reference(x: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-row float64 SwiGLU with explicit gate/up halves: gate rows first in gate_up_proj."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start : start + n].double()
        gate, up = xe @ w_gu[e, :H].double().T, xe @ w_gu[e, H:].double().T
        outs.append((torch.nn.functional.silu(gate) * up) @ w_d[e].double().T)
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[3, 5, 0, 8], [0, 0, 16, 0], [4, 4, 4, 4], [1, 0, 0, 2]])
def test_all_impls_match_reference_forward_and_grads(counts: list[int]) -> None:
    experts = GroupedExperts(E, D, H)
    experts.init_weights(0.2, 0.2, torch.Generator().manual_seed(1))
    x = torch.randn(sum(counts), D)
    tokens = torch.tensor(counts, dtype=torch.int64)
    grad_out = torch.randn(sum(counts), D)
    ref = _reference(x, experts.gate_up_proj.detach().flatten(1, 2), experts.down_proj.detach(), counts)
    results = {}
    for name, fn in EXPERT_IMPLS.items():
        xi = x.clone().requires_grad_()
        w_gu = experts.gate_up_proj.detach().flatten(1, 2).clone().requires_grad_()
        w_d = experts.down_proj.detach().clone().requires_grad_()
        y = fn(xi, w_gu, w_d, tokens)
        y.backward(grad_out)
        results[name] = (y.detach(), xi.grad, w_gu.grad, w_d.grad)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6, msg=f"{name} forward")
    base = results["loop"]
    for name, got in results.items():
        for a, b, what in zip(got, base, ("y", "dx", "dW_gate_up", "dW_down")):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} {what}")
    # An expert with no rows gets an exactly-zero gradient.
    for e, n in enumerate(counts):
        if n == 0:
            assert results["grouped_mm"][2][e].abs().max() == 0 and results["bmm"][3][e].abs().max() == 0


def test_grouped_mm_accepts_an_expanded_gradient() -> None:
    # grouped_mm's backward rejects stride-0 gradients; our wrapper makes them contiguous.
    experts = GroupedExperts(E, D, H, impl="grouped_mm")
    experts.init_weights(0.2, 0.2, torch.Generator().manual_seed(1))
    experts(torch.randn(8, D), torch.tensor([2, 2, 2, 2])).sum().backward()
    assert experts.gate_up_proj.grad is not None


def test_auto_resolves_per_device_and_rejects_unknown() -> None:
    assert resolve_impl("auto", torch.device("cuda")) == "grouped_mm"
    assert resolve_impl("auto", torch.device("cpu")) == "loop"
    with pytest.raises(ValueError, match="unknown experts_impl"):
        GroupedExperts(E, D, H, impl="triton")
