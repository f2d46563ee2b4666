"""Model code: the decoder-only transformer and its MoE core.

``Transformer(model_cfg, moe_cfg, registry=None)`` builds the model; ``register_builtin_components(registry)`` adds
the core components (attention ``"gqa"`` and ``"mla"``, moe_block ``"moe"``, router ``"topk"``) to a registry.
"""

from framework.models.moe import MoEBlock, MoELayer
from framework.models.transformer import (
    Transformer,
    TransformerBlock,
    default_registry,
    is_moe_layer,
    register_builtin_components,
)

__all__ = [
    "MoEBlock",
    "MoELayer",
    "Transformer",
    "TransformerBlock",
    "default_registry",
    "is_moe_layer",
    "register_builtin_components",
]
