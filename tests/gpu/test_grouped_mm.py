"""Grouped GEMM on CUDA (what ``experts_impl: auto`` picks there) against the per-expert loop, and a compiled MoE
block against the eager one: values and gradients, fp32 and bf16 autocast.

Closeness is measured normwise, ``|a - b| / |b|`` over a whole tensor (elementwise checks of bf16 results fail on
entries near zero without saying anything about the kernel):

- fp32: both paths are fp32 GEMMs with fp32 accumulation that split and order the K-sums differently: 1e-5 (a
  kernel that rounded to TF32, 10-bit mantissa, would be ~1e-3 off and fail);
- bf16 autocast: inputs and weights rounded to bf16 (8-bit mantissa, 2^-9) on both paths, outputs rounded to bf16:
  2e-2 for values, 3e-2 for gradients (one more bf16 GEMM);
- the compiled block (inductor fuses SwiGLU and the gate weighting; the GEMMs stay cuBLAS): 1e-5 in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from framework.config.sections import MoEConfig
from framework.models.moe.experts import experts_grouped_mm, experts_loop, resolve_impl
from framework.models.moe.layer import MoELayer

CUDA = torch.device("cuda", 0)
E, D, I = 8, 256, 512  # noqa: E741 - the expert hidden size, as in the kernels' names
TOKENS_PER_EXPERT = [37, 0, 128, 5, 64, 1, 200, 77]  # uneven, one expert with no rows


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(TOKENS_PER_EXPERT)
    x = torch.randn(n, D, generator=g)
    w_gate_up = torch.randn(E, 2 * I, D, generator=g) * D**-0.5
    w_down = torch.randn(E, D, I, generator=g) * I**-0.5
    counts = torch.tensor(TOKENS_PER_EXPERT, dtype=torch.int64)
    return x.to(CUDA), w_gate_up.to(CUDA), w_down.to(CUDA), counts.to(CUDA)


def _run(fn: Callable[..., torch.Tensor], autocast: bool, seed: int = 0) -> list[torch.Tensor]:
    x, w_gu, w_d, counts = (t.requires_grad_() if t.is_floating_point() else t for t in _inputs(seed))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w_gu, w_d, counts)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=CUDA).view_as(y)).sum().backward()
    return [y.detach(), x.grad, w_gu.grad, w_d.grad]


def test_auto_picks_grouped_mm_on_cuda() -> None:
    assert resolve_impl("auto", CUDA) == "grouped_mm"


@pytest.mark.parametrize(
    "autocast, value_tol, grad_tol", [(False, 1e-5, 1e-5), (True, 2e-2, 3e-2)], ids=["fp32", "bf16"]
)
def test_grouped_mm_matches_the_per_expert_loop(autocast: bool, value_tol: float, grad_tol: float) -> None:
    grouped = _run(experts_grouped_mm, autocast)
    loop = _run(experts_loop, autocast)
    for name, got, ref, tol in zip(
        ("y", "x grad", "gate_up grad", "down grad"), grouped, loop, (value_tol, grad_tol, grad_tol, grad_tol)
    ):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, ref) <= tol, f"{name}: {relative_error(got, ref):.2e} > {tol:g}"
    # The expert with no rows gets exactly zero gradient on both paths.
    assert grouped[2][1].abs().max() == 0 and grouped[3][1].abs().max() == 0


def test_bf16_autocast_keeps_fp32_master_gradients() -> None:
    """grouped_mm is outside autocast's op list: the kernel casts the weights itself; their gradients come back fp32
    and track the fp32 run's within the bf16 bounds above (2e-2 values, 3e-2 gradients, normwise), differing by more
    than 1e-4 (bf16 was in effect)."""
    bf16 = _run(experts_grouped_mm, autocast=True)
    fp32 = _run(experts_grouped_mm, autocast=False)
    y, x_grad, gu_grad, d_grad = bf16
    assert y.dtype == torch.bfloat16
    assert x_grad.dtype == gu_grad.dtype == d_grad.dtype == torch.float32
    for name, got, ref, tol in zip(
        ("y", "x grad", "gate_up grad", "down grad"), bf16, fp32, (2e-2, 3e-2, 3e-2, 3e-2)
    ):
        assert 1e-4 < relative_error(got, ref) <= tol, f"{name}: {relative_error(got, ref):.2e}"


def _moe_block(seed: int) -> MoELayer:
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=2, expert_hidden=I, experts_impl="grouped_mm"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return layer.to(CUDA)


def _block_step(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    y.square().mean().backward()
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]


def test_compiled_moe_block_matches_eager_values_and_gradients() -> None:
    x = torch.randn(4, 128, D, generator=torch.Generator().manual_seed(1)).to(CUDA)
    eager = _moe_block(0)
    compiled = _moe_block(0)
    compiled_fn = torch.compile(compiled)
    ref = _block_step(eager, x)
    _block_step(compiled_fn, x)  # compiles
    got = _block_step(compiled_fn, x)  # the cached graph
    assert len(got) == len(ref) > 3
    for i, (g, r) in enumerate(zip(got, ref)):
        assert relative_error(g, r) <= 1e-5, f"output {i}: {relative_error(g, r):.2e}"
