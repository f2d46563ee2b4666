"""The decoder-only transformer: embeddings -> blocks (pre-norm attention + dense or MoE feed-forward) -> norm -> head.

Layer placement: layers ``0 .. first_k_dense-1`` are dense; after them every ``moe.every``-th layer is MoE (counting
from the first non-dense layer, so ``every=2`` gives MoE, dense, MoE, …); ``num_experts == 0`` makes all layers dense.
Attention and MoE blocks come from the :class:`~framework.hooks.registry.ComponentRegistry` so plugins can swap them.

Parameter names follow transformers' Llama where a counterpart exists (``q_proj`` … ``down_proj``; experts use the
transformers-5 fused ``gate_up_proj`` / ``down_proj`` layout, with gate and up on their own axis), so checkpoint
conversion is a rename, a reshape and a copy.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from framework.config.sections import ModelConfig, MoEConfig
from framework.hooks.registry import ComponentRegistry
from framework.models.init import KeyedInit, normal_
from framework.models.kv_cache import KVCache, LayerKVCache
from framework.models.masking import document_causal_mask
from framework.models.mlp import FeedForward
from framework.models.norms import RMSNorm
from framework.models.rope import rope_tables


def register_builtin_components(registry: ComponentRegistry) -> None:
    """Register the core built-ins with owner ``"core"``: attention ``"gqa"`` and ``"mla"``, moe_block ``"moe"``,
    router ``"topk"``.

    Factory signatures: attention ``(model_cfg) -> module`` whose
    ``forward(x_BSD, cos_SR, sin_SR, position_ids_BS, attn_mask_B1SS, cache)`` returns ``[B, S, D]`` (compute the
    scores with :func:`~framework.models.kv_cache.causal_attention` to honour the mask and the cache); moe_block ``(dim, moe_cfg, registry) -> module`` implementing
    :class:`~framework.models.moe.layer.MoEBlock`; router ``(dim, moe_cfg) -> module`` returning a
    :class:`~framework.models.moe.router.RouterOutput`.
    """
    from framework.models.attention import GroupedQueryAttention
    from framework.models.mla import MultiHeadLatentAttention
    from framework.models.moe.layer import build_moe_layer, build_topk_router

    registry.register("attention", "gqa", GroupedQueryAttention, owner="core")
    registry.register("attention", "mla", MultiHeadLatentAttention, owner="core")
    registry.register("moe_block", "moe", build_moe_layer, owner="core")
    registry.register("router", "topk", build_topk_router, owner="core")


def default_registry() -> ComponentRegistry:
    """A fresh registry holding only the core built-ins."""
    registry = ComponentRegistry()
    register_builtin_components(registry)
    return registry


def is_moe_layer(layer_id: int, moe_cfg: MoEConfig) -> bool:
    """Whether block ``layer_id`` gets an MoE feed-forward (see the module docstring for the rule)."""
    if moe_cfg.num_experts == 0 or layer_id < moe_cfg.first_k_dense:
        return False
    return (layer_id - moe_cfg.first_k_dense) % moe_cfg.every == 0


def _check_moe_block(block: nn.Module, name: str) -> None:
    """One error naming the ``moe_block`` component and the :class:`MoEBlock` members its block lacks."""
    from framework.models.moe.layer import missing_block_members

    missing = missing_block_members(block)
    if missing:
        raise TypeError(
            f"moe_block '{name}' built {type(block).__name__}, which lacks {', '.join(missing)}: an MoE block must "
            "implement framework.models.moe.MoEBlock (subclass MoELayer, see docs/moe.md)"
        )


class TransformerBlock(nn.Module):
    """``h = x + attention(norm(x)); out = h + ffn(norm(h))`` with ``ffn`` a dense SwiGLU or an MoE block.

    An MoE block with ``owns_residual = True`` returns the whole output itself: ``out = ffn(norm(h))``."""

    def __init__(
        self, layer_id: int, model_cfg: ModelConfig, moe_cfg: MoEConfig, registry: ComponentRegistry
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = is_moe_layer(layer_id, moe_cfg)
        self.attention_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.attention = registry.get("attention", model_cfg.attention).factory(model_cfg)
        self.ffn_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        if self.is_moe:
            self.ffn = registry.get("moe_block", moe_cfg.block).factory(model_cfg.dim, moe_cfg, registry)
            _check_moe_block(self.ffn, moe_cfg.block)
        else:
            self.ffn = FeedForward(model_cfg.dim, model_cfg.ffn_hidden)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        position_ids_BS: torch.Tensor | None = None,
        attn_mask_B1SS: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(
            self.attention_norm(x_BSD), cos_SR, sin_SR, position_ids_BS, attn_mask_B1SS, cache
        )
        if self.is_moe and self.ffn.owns_residual:  # the block variant builds its own residual path
            return self.ffn(self.ffn_norm(h_BSD))
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(input_ids [B, S], position_ids=None) -> logits [B, S, V]`` (fp32)."""

    def __init__(
        self, model_cfg: ModelConfig, moe_cfg: MoEConfig, registry: ComponentRegistry | None = None
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        registry = registry if registry is not None else default_registry()
        # Given its weight, nn.Embedding skips its own normal_ init, which on the meta device goes through torch's
        # Python reference kernels (~3 s on first use); init_weights() fills it in any case.
        embedding_VD = torch.empty(model_cfg.vocab_size, model_cfg.dim)
        if embedding_VD.device.type != "meta":
            nn.init.normal_(embedding_VD)
        self.tok_embeddings = nn.Embedding(model_cfg.vocab_size, model_cfg.dim, _weight=embedding_VD)
        self.layers = nn.ModuleList(
            TransformerBlock(i, model_cfg, moe_cfg, registry) for i in range(model_cfg.n_layers)
        )
        self.norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.output = nn.Linear(model_cfg.dim, model_cfg.vocab_size, bias=False)
        self.tie_weights()
        cos_SR, sin_SR = self._rope_tables(self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos_SR, persistent=False)
        self.register_buffer("rope_sin", sin_SR, persistent=False)
        self._checkpointing = False

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when ``tie_embeddings`` (``to_empty`` unties them; this re-ties)."""
        if self.model_cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model_cfg
        if device.type == "meta":  # shapes only; meta arange runs torch's Python reference kernels (~2 s)
            cos_SR, sin_SR = rope_tables(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta, device="cpu")
            return cos_SR.to(device), sin_SR.to(device)
        return rope_tables(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids [B, S]`` -> fp32 logits ``[B, S, V]``.

        ``logits_at [B, S]`` (bool, optional): run the LM head only at these positions and return their logits
        ``[N, V]`` in row-major order (``N = logits_at.sum()``). The head is the largest matmul of a small model;
        in SFT most positions carry no label, so the trainer asks only for the labelled ones.

        ``position_ids [B, S]`` (optional): positions that restart at 0 mark packed documents; attention never
        crosses them (:func:`~framework.models.masking.document_causal_mask`). ``cache``: incremental decoding;
        ``input_ids`` are the tokens after the cached ones and their positions continue from ``cache.length``.
        """
        B, S = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + S > self.model_cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start + S} exceeds model.max_seq_len={self.model_cfg.max_seq_len}"
            )
        attn_mask_B1SS = None
        if cache is not None:
            if position_ids is None:
                position_ids = torch.arange(start, start + S, device=input_ids.device).expand(B, S)
        elif position_ids is not None:
            attn_mask_B1SS = document_causal_mask(position_ids)
        h_BSD = self.tok_embeddings(input_ids)
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self._checkpointing and torch.is_grad_enabled():
                h_BSD = torch.utils.checkpoint.checkpoint(
                    block,
                    h_BSD,
                    self.rope_cos,
                    self.rope_sin,
                    position_ids,
                    attn_mask_B1SS,
                    layer_cache,
                    use_reentrant=False,
                )
            else:
                h_BSD = block(h_BSD, self.rope_cos, self.rope_sin, position_ids, attn_mask_B1SS, layer_cache)
        if logits_at is not None:
            return self.output(self.norm(h_BSD[logits_at])).float()
        return self.output(self.norm(h_BSD)).float()

    def new_kv_cache(self, capacity: int | None = None) -> KVCache:
        """An empty cache for :meth:`forward` (``capacity`` tokens, default ``model.max_seq_len``)."""
        return KVCache(len(self.layers), capacity or self.model_cfg.max_seq_len)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | KeyedInit | torch.Generator = 0) -> None:
        """Deterministic init: the same values on any device and any parallel layout (see
        :mod:`framework.models.init`), also after a meta-device build + ``to_empty`` and on sharded parameters.

        Weights ``N(0, init_std)``; output projections (attention ``o_proj``, MLP / expert ``down_proj``)
        ``N(0, init_std / sqrt(2 · n_layers))``; norms 1; router ``N(0, init_std)``, expert bias 0. Also rebuilds the
        RoPE tables (non-persistent buffers are garbage after ``to_empty``) and re-ties tied embeddings.

        ``seed``: an int (values keyed by parameter name), a :class:`KeyedInit`, or a ``torch.Generator`` (values
        drawn in order: whole, unsharded parameters only).
        """
        self.tie_weights()
        generator = KeyedInit.for_model(seed, self) if isinstance(seed, int) else seed
        std = self.model_cfg.init_std
        out_std = std / math.sqrt(2 * self.model_cfg.n_layers)
        normal_(self.tok_embeddings.weight, std, generator)
        for block in self.layers:
            for module in block.children():
                _init_module(module, std, out_std, generator)
        self.norm.init_weights(std, out_std, generator)
        if not self.model_cfg.tie_embeddings:
            normal_(self.output.weight, std, generator)
        cos_SR, sin_SR = self._rope_tables(self.rope_cos.device)
        self.rope_cos.copy_(cos_SR)
        self.rope_sin.copy_(sin_SR)

    # ------------------------------------------------------------------ MoE helpers
    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward modules, in layer order."""
        return [block.ffn for block in self.layers if block.is_moe]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Pop every MoE layer's auxiliary losses and sum them by name (already coefficient-weighted)."""
        total: dict[str, torch.Tensor] = {}
        for layer in self.moe_layers():
            for name, value in layer.pop_aux_losses().items():
                total[name] = total[name] + value if name in total else value
        return total

    def discard_routing_state(self) -> None:
        """Forget the aux losses and expert counts of forwards that are not training (evaluation, generation): they
        must not move the load-balancing bias or show in the routing metrics."""
        self.aux_losses()
        for layer in self.moe_layers():
            layer.consume_expert_counts()

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block in backward (non-reentrant ``torch.utils.checkpoint``); state-dict keys unchanged."""
        self._checkpointing = True

    # ------------------------------------------------------------------ accounting
    def param_counts(self) -> dict[str, int]:
        """``total`` (tied weights once), ``embedding`` (the token table), ``active_per_token`` (total minus the
        ``E - k`` routed experts a token does not use, per MoE layer; ``k`` = the layer's ``active_experts_per_token``,
        i.e. expert applications per token, so a block that routes twice counts its FLOPs twice)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers():  # every one meets the MoEBlock contract (checked when built)
            experts = layer.experts
            per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
            used = min(layer.active_experts_per_token, experts.num_experts)
            inactive += per_expert * (experts.num_experts - used)
        return {
            "total": total,
            "embedding": self.tok_embeddings.weight.numel(),
            "active_per_token": total - inactive,
        }

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), the PaLM formula (Chowdhery et al. 2022, App. B):

        ``6 · N_matmul + 12 · n_layers · n_heads · head_dim · seq_len``

        ``N_matmul`` = active parameters per token minus the embedding lookup table (a lookup does no FLOPs); with tied
        embeddings the table *is* the LM head, so it is counted once. The attention term counts QKᵀ and AV over the
        full (not causal-halved) ``seq_len``. Norm and router element-wise work is ignored.
        """
        counts = self.param_counts()
        cfg = self.model_cfg
        n_matmul = counts["active_per_token"] - counts["embedding"]
        if cfg.tie_embeddings:
            n_matmul += counts["embedding"]
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.qk_head_dim * seq_len


def _init_module(module: nn.Module, std: float, out_std: float, generator: torch.Generator) -> None:
    """Call ``module.init_weights`` if it has one (it owns its whole subtree), else recurse; plain Linear/Embedding
    leaves get ``N(0, std)``."""
    init = getattr(module, "init_weights", None)
    if callable(init):
        init(std, out_std, generator)
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        normal_(module.weight, std, generator)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
        return
    for child in module.children():
        _init_module(child, std, out_std, generator)
