"""Numerical parity with transformers: our MoE layer vs MixtralSparseMoeBlock, our Transformer vs LlamaForCausalLM.

Weights are copied across with no transformation beyond renaming, which also proves the layouts
(fused ``gate_up_proj`` with gate rows first, rotate_half RoPE, ``repeat_kv`` GQA head order).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models_testutil import model_cfg, moe_cfg  # noqa: E402

from framework.models import Transformer  # noqa: E402
from framework.models.moe.layer import MoELayer  # noqa: E402


def _mixtral_block(impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation=impl,
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("hf_impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("our_impl", ["loop", "grouped_mm", "bmm"])
def test_moe_layer_matches_mixtral_block(hf_impl: str, our_impl: str) -> None:
    hf = _mixtral_block(hf_impl)
    ours = MoELayer(
        32, moe_cfg(num_experts=4, top_k=2, expert_hidden=48, experts_impl=our_impl, route_norm=True)
    )
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj.view_as(ours.experts.gate_up_proj))
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    x = torch.randn(3, 7, 32)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_hf = ours(x_ours), hf(x_hf)
    # fp32, same math in a different summation order: 1e-5 is ~100 ulp of the output scale.
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_hf)
    y_ours.backward(grad)
    y_hf.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.experts.gate_up_proj.grad.flatten(1, 2), hf.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(ours.router.gate.weight.grad, hf.gate.weight.grad, rtol=1e-5, atol=1e-5)

    # Router logits, probabilities and the top-k choice agree too.
    logits_hf, weights_hf, ids_hf = hf.gate(x.view(-1, 32))
    routed = ours.router(x.view(-1, 32))
    torch.testing.assert_close(routed.logits_TE, logits_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routed.scores_TE, logits_hf.float().softmax(-1), rtol=1e-6, atol=1e-6)
    assert torch.equal(routed.topk_ids_TK, ids_hf)
    torch.testing.assert_close(routed.topk_weights_TK, weights_hf, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_dense_transformer_matches_llama(tie: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_cfg(
        n_layers=2,
        dim=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        tie_embeddings=tie,
        rope_theta=500.0,
        init_std=0.15,
    )
    ours = Transformer(cfg, moe_cfg(num_experts=0))
    ours.init_weights(0)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    theirs = hf.state_dict()
    mapping = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    mapping["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours_name, hf_name in [
            ("attention_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            *[(f"attention.{p}", f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
            *[(f"ffn.{p}", f"mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")],
        ]:
            mapping[f"layers.{i}.{ours_name}.weight"] = f"model.layers.{i}.{hf_name}.weight"
    sd = ours.state_dict()
    assert set(sd) == set(mapping), "every parameter has an HF counterpart"
    with torch.no_grad():
        for ours_name, hf_name in mapping.items():
            theirs[hf_name].copy_(sd[ours_name])
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        logits_hf = hf(ids).logits
        logits = ours(ids)
        # Packed documents: positions restart at 0; both mask attention between the documents (transformers
        # detects packing from position_ids when it builds no cache).
        pos = torch.cat([torch.arange(8), torch.arange(12)]).expand(2, 20)
        logits_pos_hf = hf(ids, position_ids=pos, use_cache=False).logits
        logits_pos = ours(ids, position_ids=pos)
    # 1e-4 abs: fp32 logits of size ~1; SDPA vs eager softmax and fused vs split reductions differ by a few ulp
    # per layer, amplified by the LM head over 64 dims.
    assert logits.dtype == torch.float32 and logits.abs().max() > 1.0  # a scale where 1e-4 is tight
    torch.testing.assert_close(logits, logits_hf, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_pos, logits_pos_hf, rtol=0, atol=1e-4)
    assert not torch.allclose(logits_pos, logits, atol=1e-3)  # position_ids really matter
