"""KV-cached decoding and packed-document attention against full recomputation, on small MoE models (fp32)."""

from __future__ import annotations

import pytest
import torch

from framework.config import ModelConfig, MoEConfig
from framework.inference.generate import generate, generate_greedy_batch, rows_are_independent
from framework.models import Transformer

# fp32: the cached path computes the same sums over fewer keys at a time; differences are rounding (~1e-6).
ATOL = 2e-5


def _model(attention: str = "gqa") -> Transformer:
    extra = (
        {"attention": "mla", "n_kv_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 8, "v_head_dim": 8}
        if attention == "mla"
        else {"qkv_bias": True, "qk_norm": True}
    )  # fmt: skip
    cfg = ModelConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=40
    )
    for k, v in extra.items():
        setattr(cfg, k, v)
    model = Transformer(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, experts_impl="loop"))
    model.init_weights(3)
    rng = torch.Generator().manual_seed(4)  # the same model whatever ran before
    with torch.no_grad():  # non-trivial biases and norms so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=rng))
    return model.eval()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_cached_forward_equals_full_forward(attention: str) -> None:
    model = _model(attention)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache()
        chunks = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
        chunks += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_greedy_decoding_with_and_without_cache_gives_the_same_tokens(attention: str) -> None:
    model = _model(attention)
    prompt = [5, 17, 3, 88, 41]
    cached = generate(model, prompt, 25)
    recomputed = generate(model, prompt, 25, use_cache=False)
    assert cached == recomputed and len(cached) == 25
    assert len(set(cached)) > 1, "a degenerate model would make this test weak"


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_batched_greedy_answers_equal_one_prompt_at_a_time(attention: str) -> None:
    # fp64: batched products sum in another order, so in fp32 a near-tie between two logits can flip a greedy token
    # (seen once, in a run under heavy CPU load).
    model = _model(attention).double()
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=rng).tolist() for n in (5, 9, 5, 5, 9, 3, 5)]
    alone = [generate(model, p, 12) for p in prompts]
    stop = {alone[0][3], alone[4][1]}  # two rows stop early, at different steps; the others run to the end
    alone_stopped = [generate(model, p, 12, stop_ids=stop) for p in prompts]
    assert generate_greedy_batch(model, prompts, 12, batch_size=2) == alone  # batches split within a length
    assert generate_greedy_batch(model, prompts, 12, stop_ids=stop) == alone_stopped
    assert len({len(a) for a in alone_stopped}) > 1, "stop ids should end some answers early"
    assert all(int(layer.consume_expert_counts().sum()) == 0 for layer in model.moe_layers())


def test_batched_greedy_builds_no_autograd_graph_when_grad_is_on() -> None:
    model = _model()
    grad_on: list[bool] = []
    model.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    with torch.enable_grad():
        generate_greedy_batch(model, [[1, 2, 3], [4, 5, 6]], 3)
    assert grad_on and not any(grad_on)


def test_batched_greedy_refuses_experts_that_drop_tokens() -> None:
    model = _model()
    assert rows_are_independent(model)  # dropless experts: each token is routed alone
    model.moe_cfg.capacity_factor = 1.0
    assert not rows_are_independent(model)
    with pytest.raises(ValueError, match="capacity_factor"):
        generate_greedy_batch(model, [[1, 2, 3]], 4)


def test_sampling_is_seeded_and_top_k_1_is_greedy_and_stop_ids_end_it() -> None:
    model = _model()
    prompt = [1, 2, 3]
    a = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    assert a == generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    assert generate(model, prompt, 12, temperature=1.0, top_k=1, seed=9) == generate(model, prompt, 12)
    nucleus = generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == generate(model, prompt, 12), "a tiny top_p keeps only the most likely token"
    greedy = generate(model, prompt, 12)
    stopped = generate(model, prompt, 12, stop_ids={greedy[4]})
    assert stopped == greedy[: greedy.index(greedy[4]) + 1]


def test_generation_leaves_no_routing_statistics_behind() -> None:
    model = _model()
    generate(model, [4, 5, 6], 5)
    assert all(int(layer.consume_expert_counts().sum()) == 0 for layer in model.moe_layers())
    assert model.aux_losses() == {}


def test_packed_documents_do_not_see_each_other() -> None:
    """A row packing three documents (positions restart at 0) gives each document the logits it has alone."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (6, 9, 5)]
    packed = torch.cat(docs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        logits = model(packed, positions)
        alone = torch.cat([model(d.unsqueeze(0)) for d in docs], dim=1)
        unmasked = model(packed)
    torch.testing.assert_close(logits, alone, atol=ATOL, rtol=0)
    assert (unmasked[0, 6:] - alone[0, 6:]).abs().max() > 1e-3, "without positions the documents would mix"
