"""Text generation for quick checks of a trained model: greedy or sampled decoding with a KV cache.

:func:`generate` runs the prompt through the model once (prefill, filling the cache), then one token per forward.
Greedy decoding with the cache gives exactly the tokens of greedy decoding without it (tested); sampling draws from
a seeded generator, so a run is repeatable. :func:`exact_match_accuracy` answers held-out chat items greedily and
scores them (``framework/data/sft_tasks.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from framework.models import Transformer


def _next_token(
    logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """Greedy when ``temperature == 0``; else sample from the softmax at ``temperature`` restricted to the ``top_k``
    most likely tokens (0 = all) and to the smallest set whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(torch.argmax(logits_V))
    logits_V = logits_V.float() / temperature
    if top_k:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        cumulative_V = torch.softmax(sorted_V, -1).cumsum(-1)
        drop_V = cumulative_V - torch.softmax(sorted_V, -1) >= top_p  # keep the token that crosses top_p
        logits_V = logits_V.scatter(0, order_V[drop_V], float("-inf"))
    return int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids after ``prompt_ids`` (at most ``max_new_tokens``; a stop id ends it and is included).

    One unsharded model on one device. ``use_cache=False`` recomputes the whole sequence every step (a check of the
    cache, or a model whose attention component ignores it). The model's routing statistics from these forwards
    are discarded, so generating never moves the MoE load-balancing bias.
    """
    if not prompt_ids:
        raise ValueError("generate needs a prompt of at least one token")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    limit = model.model_cfg.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; model.max_seq_len={limit} leaves no room")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    device = model.tok_embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    new: list[int] = []
    cache = model.new_kv_cache(len(prompt_ids) + max_new_tokens) if use_cache else None
    step_input = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        for _ in range(max_new_tokens):
            logits_BSV = model(step_input, cache=cache) if cache is not None else model(step_input)
            token = _next_token(logits_BSV[0, -1].cpu(), temperature, top_k, top_p, generator)
            new.append(token)
            ids.append(token)
            if token in stop_ids:
                break
            if cache is not None:
                step_input = torch.tensor([[token]], dtype=torch.long, device=device)
            else:
                step_input = torch.tensor([ids], dtype=torch.long, device=device)
    finally:
        model.discard_routing_state()
        model.train(was_training)
    return new


def rows_are_independent(model: Transformer) -> bool:
    """Whether the rows of a batch cannot change each other's outputs: false only for MoE experts that drop tokens
    over capacity (``moe.capacity_factor > 0``), where the rows compete for the same slots."""
    moe = model.moe_cfg
    return moe is None or not moe.num_experts or moe.capacity_factor <= 0


@torch.no_grad()
def generate_greedy_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_ids: Collection[int] = (),
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy answers to many prompts: :func:`generate`'s tokens for each, computed ``batch_size`` prompts at a time.

    Only prompts of the same length share a batch, so every row sees the positions and the causal mask it would see
    alone (no padding); a row's answer ends at its first stop id, and a batch stops once every row has. Rows are
    independent through the model (attention within a row, routing per token), which is why a model whose experts
    drop tokens over capacity (``moe.capacity_factor > 0``: the rows of a batch compete) is refused. The tokens can
    differ from one-at-a-time decoding only where two logits tie within rounding (batched matrix products sum in
    another order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("generate_greedy_batch needs prompts of at least one token each")
    if not rows_are_independent(model):
        raise ValueError(
            f"moe.capacity_factor={model.moe_cfg.capacity_factor} drops tokens over capacity, so the rows of a batch "
            "would change each other's answers: use generate() one prompt at a time"
        )
    limit = model.model_cfg.max_seq_len
    if (longest := max((len(p) for p in prompts), default=0)) >= limit:
        raise ValueError(f"a prompt has {longest} tokens; model.max_seq_len={limit} leaves no room")
    device = model.tok_embeddings.weight.device
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    answers: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for length, rows in by_length.items():
            steps = min(max_new_tokens, limit - length)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                cache = model.new_kv_cache(length + steps)
                step_input = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
                open_rows = set(range(len(chunk)))
                for _ in range(steps):
                    tokens = model(step_input, cache=cache)[:, -1].argmax(dim=-1).tolist()
                    for j in sorted(open_rows):
                        answers[chunk[j]].append(tokens[j])
                        if tokens[j] in stop_ids:
                            open_rows.discard(j)
                    if not open_rows:
                        break
                    step_input = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
    finally:
        model.discard_routing_state()
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model: Transformer,
    chat: Any,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int = 16,
    batch_size: int = 1,
) -> tuple[float, list[str]]:
    """Greedy answers to chat rows (all but their last assistant turn as the prompt) and the share equal to the
    reference after :func:`~framework.data.sft_tasks.normalize_answer`. ``chat``: a
    :class:`~framework.data.sft.ChatTokenizer`; ``batch_size > 1``: rows of equal prompt length answered together
    (:func:`generate_greedy_batch`). Returns ``(accuracy, predictions)``."""
    from framework.data.sft_tasks import exact_match, prompt_and_reference

    stop = chat.stop_ids()
    prompts, references = [], []
    for row in rows:
        messages, reference = prompt_and_reference(row)
        prompts.append(chat.encode(chat.render(messages, add_generation_prompt=True)))
        references.append(reference)
    if batch_size > 1:
        answers = generate_greedy_batch(model, prompts, max_new_tokens, stop_ids=stop, batch_size=batch_size)
    else:
        answers = [generate(model, prompt, max_new_tokens, stop_ids=stop) for prompt in prompts]
    predictions = [chat.decode([t for t in answer if t not in stop]) for answer in answers]
    return exact_match(predictions, references), predictions
