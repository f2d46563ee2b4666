"""The shared low-rank adapter math: ΔW = s·B·A, zero delta at init, merge/unmerge, peft tensor layouts.

Tolerances (fp32, values of order 1): a matmul in another association order or a merged weight differs by
round-off, ~1e-6 relative; we allow 1e-5 absolute / 1e-5 relative. Layout conversions are pure reshapes: exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from plugins.peft.low_rank import (
    ExpertsLoRA,
    LinearLoRA,
    delta_weight,
    experts_from_peft,
    experts_to_peft,
    init_lora_,
    linear_init_,
    lora_scaling,
    merge_,
    peft_key,
    unmerge_,
    write_adapter,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trained_linear(in_f: int = 12, out_f: int = 10, r: int = 4) -> LinearLoRA:
    lora = LinearLoRA(in_f, out_f, r=r, alpha=8.0)
    lora.reset_parameters(generator=_gen(1))
    with torch.no_grad():  # B as if trained: nonzero
        lora.lora_B.normal_(0.0, 0.5, generator=_gen(2))
    return lora


def test_scaling_is_alpha_over_r_or_sqrt_r() -> None:
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(8, 16, rslora=True) == pytest.approx(16 / math.sqrt(8))
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(0, 16)


def test_delta_is_scaled_sum_of_rank_one_terms() -> None:
    lora = _trained_linear()
    A, B, s = lora.lora_A.detach(), lora.lora_B.detach(), lora.scaling
    by_hand = sum(s * torch.outer(B[:, j], A[j]) for j in range(lora.r))
    torch.testing.assert_close(lora.delta_weight().detach(), by_hand, **TOL)
    x = torch.randn(3, 5, 12, generator=_gen(3))
    torch.testing.assert_close(lora(x).detach(), x @ by_hand.T, **TOL)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_gives_zero_delta_and_the_documented_distribution(init: str) -> None:
    r, d_in = 4, 4096
    lora = LinearLoRA(d_in, 8, r=r, alpha=8.0)
    lora.reset_parameters(init, generator=_gen())  # type: ignore[arg-type]
    assert torch.count_nonzero(lora.lora_B) == 0
    x = torch.randn(2, d_in, generator=_gen(1))
    assert torch.count_nonzero(lora(x)) == 0
    A = lora.lora_A.detach()
    if init == "kaiming":  # U(-1/√in, 1/√in): std = bound/√3
        assert A.abs().max() <= 1 / math.sqrt(d_in)
        expected_std = 1 / math.sqrt(d_in) / math.sqrt(3)
    else:
        expected_std = 1 / r
    # 16384 samples: the sample std is within ~1% of the true one (3 sigma); 5% leaves room.
    assert A.std().item() == pytest.approx(expected_std, rel=0.05)


def test_init_of_stacked_experts_uses_the_input_size_as_fan_in() -> None:
    A, B = torch.empty(6, 4, 100), torch.ones(6, 7, 4)
    init_lora_(A, B, "kaiming", _gen())
    assert torch.count_nonzero(B) == 0
    assert A.abs().max() <= 1 / math.sqrt(100)
    assert A.abs().max() > 0.9 / math.sqrt(100)  # not the 1/√(4·100) a 3-D fan-in would give
    # Same generator, same values on every call: adapters are identical on every rank.
    A2 = torch.empty(6, 4, 100)
    init_lora_(A2, torch.empty(6, 7, 4), "kaiming", _gen())
    assert torch.equal(A, A2)
    w = linear_init_(torch.empty(5, 100), _gen())
    assert w.abs().max() <= 1 / math.sqrt(100)


def test_merge_and_unmerge_on_a_linear() -> None:
    lora = _trained_linear()
    W = torch.randn(10, 12, generator=_gen(4))
    W0 = W.clone()
    x = torch.randn(7, 12, generator=_gen(5))
    unmerged = F.linear(x, W) + lora(x).detach()
    lora.merge_into(W)
    torch.testing.assert_close(F.linear(x, W), unmerged, **TOL)
    lora.unmerge_from(W)
    torch.testing.assert_close(W, W0, atol=1e-6, rtol=0)  # adding and subtracting ΔW: fp32 round-off only


def _grouped_rows(tokens: list[int], d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(sum(tokens), d_in, generator=_gen(6)), torch.tensor(tokens)


def test_experts_delta_on_fused_gate_up_and_down() -> None:
    E, H, hidden, r = 3, 8, 6, 2
    tokens = [4, 0, 5]  # an expert without rows is fine
    gate_up = torch.randn(E, 2, hidden, H, generator=_gen(7))  # our fused layout: [E, 2I, H] in memory
    down = torch.randn(E, H, hidden, generator=_gen(8))
    for weight, d_in, d_out in ((gate_up, H, 2 * hidden), (down, hidden, H)):
        lora = ExpertsLoRA(E, d_in, d_out, r=r, alpha=4.0)
        lora.reset_parameters(generator=_gen(9))
        with torch.no_grad():
            lora.lora_B.normal_(0.0, 0.5, generator=_gen(10))
        x, counts = _grouped_rows(tokens, d_in)
        w_eoi = weight.reshape(E, d_out, d_in)
        base = torch.cat([xe @ w_eoi[e].T for e, xe in enumerate(torch.split(x, tokens))])
        unmerged = base + lora(x, counts).detach()
        # Expert by expert against the definition ΔW_e = s·B_e·A_e.
        by_hand = torch.cat(
            [
                xe @ (w_eoi[e] + lora.scaling * lora.lora_B[e] @ lora.lora_A[e]).T
                for e, xe in enumerate(torch.split(x, tokens))
            ]
        ).detach()
        torch.testing.assert_close(unmerged, by_hand, **TOL)
        original = weight.clone()
        lora.merge_into(weight)  # the fused 4-D gate_up weight is merged through its [E, 2I, H] memory view
        merged_w = weight.reshape(E, d_out, d_in)
        merged = torch.cat([xe @ merged_w[e].T for e, xe in enumerate(torch.split(x, tokens))])
        torch.testing.assert_close(merged, unmerged, **TOL)
        lora.unmerge_from(weight)
        torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)


def test_peft_expert_layout_matches_peft_param_wrapper() -> None:
    E, r, d_in, d_out = 3, 2, 5, 4
    A = torch.randn(E, r, d_in, generator=_gen(11))
    B = torch.randn(E, d_out, r, generator=_gen(12))
    peft_A, peft_B = experts_to_peft(A, B)
    assert peft_A.shape == (E * r, d_in) and peft_B.shape == (d_out, r * E)
    for e in range(E):
        for j in range(r):
            assert torch.equal(peft_A[e * r + j], A[e, j])  # expert-major rows
            assert torch.equal(peft_B[:, j * E + e], B[e, :, j])  # rank-major columns
    # peft's ParamWrapper.get_delta_weight for a [E, out, in] parameter (transformers-5 layout):
    # einsum("o r e, e r i -> e o i", B.reshape(out, r, E), A.reshape(E, r, in)).
    peft_delta = torch.einsum("ore,eri->eoi", peft_B.reshape(d_out, r, E), peft_A.reshape(E, r, d_in))
    torch.testing.assert_close(peft_delta, delta_weight(A, B, 1.0), **TOL)
    back_A, back_B = experts_from_peft(peft_A, peft_B, E)
    assert torch.equal(back_A, A) and torch.equal(back_B, B)
    with pytest.raises(ValueError, match="experts"):
        experts_from_peft(peft_A, peft_B, 4)


def test_peft_key_names() -> None:
    assert (
        peft_key("layers.3.attention.q_proj", "lora_A")
        == "base_model.model.layers.3.attention.q_proj.lora_A.weight"
    )
    assert peft_key("layers.0.ffn.down_proj", "lora_B").endswith("down_proj.lora_B.weight")


def test_write_adapter_round_trip(tmp_path: Path) -> None:
    lora = _trained_linear()
    tensors = {
        peft_key("layers.0.attention.q_proj", "lora_A"): lora.lora_A,
        peft_key("layers.0.attention.q_proj", "lora_B"): lora.lora_B,
    }
    files = write_adapter(tmp_path / "out", tensors, {"r": 4, "lora_alpha": 8.0})
    assert files == ["adapter_model.safetensors", "adapter_config.json"]
    loaded = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v.detach())
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == {"r": 4, "lora_alpha": 8.0}


def test_merge_functions_accept_stacked_weights() -> None:
    A, B = torch.randn(2, 3, 4, generator=_gen(13)), torch.randn(2, 5, 3, generator=_gen(14))
    W = torch.zeros(2, 5, 4)
    merge_(W, A, B, 0.5)
    torch.testing.assert_close(W, 0.5 * B @ A, **TOL)
    unmerge_(W, A, B, 0.5)
    assert W.abs().max() < 1e-6


@pytest.mark.parametrize("scaling", [2.0, 0.37, 1 / 3])
def test_merge_adds_exactly_the_bits_of_delta_weight(scaling: float) -> None:
    """merge_ scales ``B·A`` in place (one ``ΔW`` in memory, for streamed merges): the sum must be bit for bit
    ``W + delta_weight(A, B, s)``, the merge exports wrote before."""
    A, B = torch.randn(4, 8, 24, generator=_gen(15)), torch.randn(4, 32, 8, generator=_gen(16))
    W = torch.randn(4, 32, 24, generator=_gen(17))
    expected = W + delta_weight(A, B, scaling)
    merge_(W, A, B, scaling)
    assert torch.equal(W, expected)
