"""Transformer build: layer placement, registry use, deterministic (meta) init, parameter and FLOP accounting, AC."""

from __future__ import annotations

import pytest
import torch
from models_testutil import model_cfg, moe_cfg

from framework.hooks.registry import ComponentError, ComponentRegistry
from framework.models import MoELayer, Transformer, is_moe_layer, register_builtin_components
from framework.models.mlp import FeedForward


def test_layer_placement() -> None:
    kinds = [is_moe_layer(i, moe_cfg(first_k_dense=1, every=2)) for i in range(6)]
    assert kinds == [False, True, False, True, False, True]
    assert not any(is_moe_layer(i, moe_cfg(num_experts=0)) for i in range(4))
    m = Transformer(model_cfg(n_layers=3), moe_cfg(first_k_dense=1))
    assert [type(b.ffn) for b in m.layers] == [FeedForward, MoELayer, MoELayer]
    assert len(m.moe_layers()) == 2


def test_builtins_registered_as_core_and_registry_selects_blocks() -> None:
    registry = ComponentRegistry()
    register_builtin_components(registry)
    assert registry.get("attention", "gqa").owner == "core"
    assert registry.get("moe_block", "moe").owner == "core" and registry.get("router", "topk").owner == "core"

    class MyBlock(MoELayer):
        pass

    registry.register("moe_block", "mine", lambda dim, cfg, reg: MyBlock(dim, cfg), owner="plugin")
    m = Transformer(model_cfg(), moe_cfg(block="mine"), registry)
    assert all(isinstance(layer, MyBlock) for layer in m.moe_layers())
    with pytest.raises(ComponentError, match="no moe_block component named 'nope'"):
        Transformer(model_cfg(), moe_cfg(block="nope"), registry)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_init_equals_direct_build(tie: bool) -> None:
    cfg, mcfg = model_cfg(tie_embeddings=tie), moe_cfg(bias_update_rate=1e-3, first_k_dense=1)
    direct = Transformer(cfg, mcfg)
    direct.init_weights(123)
    with torch.device("meta"):
        lazy = Transformer(cfg, mcfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights(123)
    a, b = direct.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and "layers.1.ffn.router.expert_bias" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(direct.rope_cos, lazy.rope_cos)
    assert (lazy.output.weight is lazy.tok_embeddings.weight) == tie
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.equal(direct(ids), lazy(ids))
    other = Transformer(cfg, mcfg)
    other.init_weights(124)
    assert not torch.equal(other.tok_embeddings.weight, direct.tok_embeddings.weight)


def test_init_statistics() -> None:
    cfg = model_cfg(n_layers=2, init_std=0.05, dim=128, n_heads=4, n_kv_heads=2)
    m = Transformer(cfg, moe_cfg(num_experts=4, expert_hidden=256))
    m.init_weights(0)
    out_std = 0.05 / (2 * cfg.n_layers) ** 0.5
    assert m.layers[0].attention.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert m.layers[0].attention.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert m.layers[0].ffn.experts.down_proj.std().item() == pytest.approx(out_std, rel=0.05)
    assert m.layers[0].ffn.experts.gate_up_proj.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.all(m.layers[0].attention_norm.weight == 1)


def test_param_counts_by_hand() -> None:
    V, D, L, H, KV, hd, F, E, K, inter = 97, 64, 3, 4, 2, 16, 96, 4, 2, 48
    cfg = model_cfg(vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=KV, ffn_hidden=F)
    m = Transformer(cfg, moe_cfg(num_experts=E, top_k=K, expert_hidden=inter, first_k_dense=1))
    attn = D * H * hd * 2 + D * KV * hd * 2
    norms = 2 * D
    dense = 3 * D * F
    expert = 3 * D * inter
    router = D * E
    total = V * D + V * D + D + L * (attn + norms) + dense + 2 * (router + E * expert)
    counts = m.param_counts()
    assert counts == {"total": total, "embedding": V * D, "active_per_token": total - 2 * (E - K) * expert}
    flops = m.flops_per_token(32)
    assert flops == 6 * (counts["active_per_token"] - V * D) + 12 * L * H * hd * 32
    tied = Transformer(
        model_cfg(vocab_size=V, dim=D, n_layers=L, ffn_hidden=F, tie_embeddings=True), moe_cfg()
    )
    assert tied.param_counts()["total"] == m.param_counts()["total"] - V * D + (E * expert + router) - dense


def test_activation_checkpointing_same_loss_grads_and_counts() -> None:
    cfg, mcfg = model_cfg(), moe_cfg(z_loss_coef=1e-3, bias_update_rate=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    results = []
    for ac in (False, True):
        m = Transformer(cfg, mcfg)
        m.init_weights(0)
        if ac:
            m.enable_activation_checkpointing()
        logits = m(ids)
        aux = m.aux_losses()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), ids.view(-1))
        (loss + sum(aux.values())).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        counts = [layer.consume_expert_counts() for layer in m.moe_layers()]
        results.append((loss.detach(), {k: v.detach() for k, v in aux.items()}, grads, counts))
    (l0, a0, g0, c0), (l1, a1, g1, c1) = results
    torch.testing.assert_close(l0, l1)
    assert a0.keys() == a1.keys() == {"load_balance", "router_z"}
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)
    for a, b in zip(c0, c1):
        assert torch.equal(a, b) and a.sum() == 2 * 12 * 2


def _logits_and_grads(autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = Transformer(model_cfg(), moe_cfg())
    m.init_weights(0)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m(ids)
    assert logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad for n, p in m.named_parameters()}


def test_bf16_autocast_forward_backward_tracks_fp32() -> None:
    """The same weights and batch with and without bf16 autocast. bf16 keeps 8 significant bits (u = 2^-8 ≈ 3.9e-3
    per rounding of a matmul input or output); through two blocks the logits measured 3.5e-3 and the worst gradient
    9.0e-3 off in relative norm, bounded here by 2e-2 and 5e-2 (a few roundings compounded). Every parameter gets an
    fp32 gradient, and the difference is above 1e-4 (autocast did run in bf16)."""
    logits16, grads16 = _logits_and_grads(True)
    logits32, grads32 = _logits_and_grads(False)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert 1e-4 < relative(logits16, logits32) < 2e-2
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g32 is not None and g16 is not None and g16.dtype == torch.float32, name
        assert relative(g16, g32) < 5e-2, name
    assert max(relative(grads16[n], g) for n, g in grads32.items()) > 1e-4


def test_rejects_too_long_sequences() -> None:
    m = Transformer(model_cfg(max_seq_len=8), moe_cfg())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.int64))


def test_logits_at_labelled_positions_equal_the_full_head() -> None:
    """The head run only at some positions gives those positions' logits, and the same loss gradients."""
    torch.manual_seed(0)
    m = Transformer(model_cfg(), moe_cfg())
    m.init_weights(0)
    ids = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    keep = torch.rand(2, 16) < 0.3
    labels[~keep] = -100
    full = m(ids)
    part = m(ids, logits_at=keep)
    assert part.shape == (int(keep.sum()), 97)
    torch.testing.assert_close(part, full[keep], rtol=0, atol=1e-6)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        m.zero_grad()
        m.discard_routing_state()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g_full = grads(torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), labels.flatten(), reduction="sum"))
    g_part = grads(torch.nn.functional.cross_entropy(m(ids, logits_at=keep), labels[keep], reduction="sum"))
    assert g_full.keys() == g_part.keys() and "output.weight" in g_full
    for name in g_full:
        torch.testing.assert_close(g_part[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_keyed_init_values_depend_on_name_not_on_other_parameters() -> None:
    """A parameter's keyed initial values are a function of (seed, name) only: a model with a layer more (and so
    other tensors drawn before it) gives every shared parameter the same values; a sequential generator would not."""
    small, big = Transformer(model_cfg(n_layers=2), moe_cfg()), Transformer(model_cfg(n_layers=3), moe_cfg())
    small.init_weights(7)
    big.init_weights(7)
    big_sd = big.state_dict()
    shared = [k for k in small.state_dict() if k.startswith("layers.1.")] + ["tok_embeddings.weight"]
    for k in shared:
        if k.endswith("down_proj.weight") or k.endswith("o_proj.weight") or k.endswith("experts.down_proj"):
            continue  # output projections are scaled by 1/sqrt(2 n_layers)
        assert torch.equal(small.state_dict()[k], big_sd[k]), k


def test_activation_checkpointing_keeps_no_recomputed_aux_terms_after_backward() -> None:
    """A recompute computes the aux terms again (the checkpoint needs their saved tensors) and may stop early, before
    the layer's forward ends; nothing of it may stay on the layer after the backward (it held the recomputed
    activations of the last micro-batch alive until the next step: ~240 MiB at the planner's largest CPU size)."""
    cfg, mcfg = model_cfg(), moe_cfg(z_loss_coef=1e-3)
    m = Transformer(cfg, mcfg)
    m.init_weights(0)
    m.enable_activation_checkpointing()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = m(ids)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), ids.view(-1))
    (loss + sum(m.aux_losses().values())).backward()
    for layer in m.moe_layers():
        assert layer._aux_this_forward == {}
