"""Compacter (Karimi Mahabadi et al., arXiv 2106.04647). Plugin ``compacter``.

A bottleneck adapter after the attention output and after the FFN output of every block (Compacter++: after the FFN
only), inside the residual branch::

    a ← a + U(GeLU(D a))            a = attention(norm(x)) or ffn(norm(h)),  D: d → k,  U: k → d,  k = d / reduction

``D`` and ``U`` are PHM layers (parameterized hypercomplex multiplication): ``W = Σ_{i=1..n} A_i ⊗ B_i`` (``W`` in the
``[out, in]`` layout, ``y = W x + b``), with ``A_i ∈ R^{n×n}`` "slow" rules SHARED by every PHM layer of the model
(one ``[n, n, n]`` tensor) and rank-1 "fast" weights ``B_i = s_i t_iᵀ``, ``s_i ∈ R^{out/n}``, ``t_i ∈ R^{in/n}`` per layer.
A PHM layer has ``in + out`` weights plus an ``out`` bias, so the adapters hold

    n³ + A · 2(d + k)   weights   (A adapters: 2·L for Compacter, L for Compacter++; the paper's 4L(d+k) + n³)
    + A · (d + k)       biases

Init as the reference (rabeehk/compacter ``PHMLinear``): ``s``, ``t`` Glorot-uniform with gain √2 (fans of the
reference's ``[n, in/n, 1]`` / ``[n, 1, out/n]`` factor tensors), rules ``N(0, rules_std²)`` with ``rules_std = 1e-4``,
biases 0. The up-projection is therefore not zero but tiny (``~1e-4`` relative), so each block starts as the identity
to ``~1e-7`` relative: the model's output at step 0 is the base model's to fp32 round-off.

Trained: the adapters, the shared rules and the RMSNorm weights (``compacter.train_norms``); the base is frozen.
Compacter is not a weight delta (the bottleneck is nonlinear), so it cannot be merged into the base weights or
exported as a peft LoRA: :data:`MERGEABLE` is ``False``, ``expertrain export hf --merge``
(``expertrain_merge_adapters``) and ``expertrain export peft`` refuse it by name. Its own
format: ``expertrain export compacter`` (``adapter_model.safetensors`` + ``adapter_config.json``).

Parallelism: data parallelism (DDP, FSDP2), expert parallelism and tensor parallelism. Under tensor parallelism the
adapted outputs are DTensors ``[B, S, D]`` on the ``tp`` mesh, placed ``Shard(1)`` (sequence parallelism: each rank
holds its own tokens) or ``Replicate()`` (every rank holds the same tokens). The adapters (a few thousand weights)
are whole on every tensor-parallel rank, as plain parameters that stay identical there, and run on the local tokens
(:meth:`CompacterAdapter.forward`); the output keeps the input's placement. Their gradient is then each rank's
tokens' share under sequence parallelism, summed over ``tp`` in the backward (one all-reduce per adapter, rules
included); without it every rank already computes the whole, identical gradient, which is therefore not summed.
They are plain rather than DTensor parameters because the model has no hook between the tensor-parallel plan and
the data-parallel wrapping (``expertrain_after_parallelize`` runs after FSDP2 has sharded the parameters); as one
fused AdamW call cannot mix them with the DTensor norms, the rules and adapters have optimizer groups of their own
(:func:`expertrain_optimizer_param_groups`, in every layout).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from framework.config import ConfigError, JobConfig, option
from framework.hooks import PluginError, hookimpl
from framework.models.init import InitSource, KeyedInit, normal_, uniform_
from framework.models.norms import RMSNorm
from framework.models.sharding import local_weight
from framework.observe import console
from plugins.peft.low_rank import write_adapter
from plugins.peft.modules_to_save import (
    coverage_detail,
    format_fields,
    modules_to_save_option,
    native_tensors,
    resolve,
    trainable_names,
)

SECTION = "compacter"
EXPORT_FORMAT = "compacter"
MERGEABLE = False
"""Compacter adapters cannot be merged into the base weights (nor written as a peft LoRA): exporters check this."""
RULES_MODULE = "compacter_rules"
ADAPTER_SITES = {"attention": "attention_adapter", "ffn": "ffn_adapter"}
"""Block child adapted -> name of the adapter module registered on the block."""

Variant = Literal["compacter", "compacter++"]
Nonlinearity = Literal["gelu", "gelu_tanh", "relu"]


@dataclass
class CompacterConfig:
    """Compacter: PHM bottleneck adapters with shared Kronecker rules (arXiv 2106.04647)."""

    variant: Variant = option(
        "compacter",
        doc="compacter: adapters after attention and after the FFN; compacter++: after the FFN only.",
    )
    n: int = option(
        4, doc="PHM dimension n: n shared n×n rules; model.dim and the bottleneck divisible by n.", min=1
    )
    reduction_factor: int = option(32, doc="Bottleneck size k = model.dim / reduction_factor.", min=1)
    nonlinearity: Nonlinearity = option("gelu", doc="Bottleneck activation: gelu (erf), gelu_tanh or relu.")
    rules_std: float = option(
        1e-4, doc="Std of the normal init of the shared rules (the reference's 1e-4).", min=0.0
    )
    train_norms: bool = option(
        True, doc="Also train every RMSNorm weight (the paper trains the layer norms)."
    )
    seed: int = option(0, doc="Seed of the adapter init (the same adapters on every rank and layout).", min=0)
    modules_to_save: list[str] = modules_to_save_option()


def bottleneck_size(dim: int, cfg: CompacterConfig) -> int:
    """``k = dim // reduction_factor``."""
    return dim // cfg.reduction_factor


def adapter_count(n_layers: int, variant: str) -> int:
    """Adapters in a model of ``n_layers`` blocks: two per block (Compacter) or one (Compacter++)."""
    return n_layers * (1 if variant == "compacter++" else 2)


def parameter_count(n: int, d: int, k: int, adapters: int, bias: bool = True) -> int:
    """Trainable adapter parameters: ``n³`` shared rules, ``2(d + k)`` rank-1 factors per adapter (``in + out`` per PHM
    layer), plus ``d + k`` biases per adapter when ``bias``."""
    return n**3 + adapters * (2 * (d + k) + ((d + k) if bias else 0))


# --- the PHM layer and the adapter --------------------------------------------------------------------------------


def kron_sum(rules_NNN: torch.Tensor, B_Npq: torch.Tensor) -> torch.Tensor:
    """``Σ_i A_i ⊗ B_i`` for ``A [n, n, n]`` and ``B [n, p, q]`` -> ``[n·p, n·q]``."""
    n, p, q = B_Npq.shape
    return torch.einsum("iab,icd->acbd", rules_NNN, B_Npq).reshape(n * p, n * q)


def phm_weight(rules_NNN: torch.Tensor, s_Np: torch.Tensor, t_Nq: torch.Tensor) -> torch.Tensor:
    """The PHM matrix ``Σ_i A_i ⊗ s_i t_iᵀ`` ``[n·p, n·q]`` of rules ``[n, n, n]``, ``s [n, p]`` and ``t [n, q]``."""
    return kron_sum(rules_NNN, s_Np.unsqueeze(2) * t_Nq.unsqueeze(1))


def phm_linear(
    x: torch.Tensor, rules_NNN: torch.Tensor, s_Np: torch.Tensor, t_Nq: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``y = (Σ_i A_i ⊗ s_i t_iᵀ) x + b`` in ``x``'s dtype."""
    return F.linear(x, phm_weight(rules_NNN, s_Np, t_Nq).to(x.dtype), bias.to(x.dtype))


class SharedRules(nn.Module):
    """The ``n`` slow rules ``A_i [n, n]`` every PHM layer of the model uses (one parameter ``rules [n, n, n]``)."""

    def __init__(self, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n = n
        self.rules = nn.Parameter(torch.zeros(n, n, n, device=device, dtype=dtype))

    def reset_parameters(self, std: float, generator: InitSource = None) -> None:
        normal_(self.rules, std, generator)


def _glorot_uniform_(t: torch.Tensor, fan_in: int, fan_out: int, generator: InitSource) -> None:
    bound = math.sqrt(2.0) * math.sqrt(
        6.0 / (fan_in + fan_out)
    )  # xavier_uniform_ with gain √2, as the reference
    uniform_(t, -bound, bound, generator)


class PHMLinear(nn.Module):
    """``y = (Σ_i A_i ⊗ s_i t_iᵀ) x + b``: ``s [n, out/n]``, ``t [n, in/n]``, ``bias [out]``; ``A`` from ``rules``.

    ``rules`` is held as a plain attribute (not a submodule): it is registered once on the model root and read at
    every forward, so data-parallel wrappers see one shared parameter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rules: SharedRules,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = rules.n
        if in_features % n or out_features % n:
            raise ValueError(
                f"PHM layer {in_features} -> {out_features}: both sizes must be divisible by n={n}"
            )
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.s = nn.Parameter(torch.zeros(n, out_features // n, device=device, dtype=dtype))
        self.t = nn.Parameter(torch.zeros(n, in_features // n, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        object.__setattr__(self, "_rules", rules)

    def reset_parameters(self, generator: InitSource = None) -> None:
        """``t`` and ``s`` Glorot-uniform with the reference's fans (``W_left [n, in/n, 1]``: fan_in ``in/n``,
        fan_out ``n``; ``W_right [n, 1, out/n]``: fan_in ``out/n``, fan_out ``out``); bias 0."""
        n = self.n
        _glorot_uniform_(self.t, self.in_features // n, n, generator)
        _glorot_uniform_(self.s, self.out_features // n, self.out_features, generator)
        with torch.no_grad():
            self.bias.zero_()

    def weight(self) -> torch.Tensor:
        """The layer's ``[out, in]`` matrix ``Σ_i A_i ⊗ s_i t_iᵀ``."""
        return phm_weight(self._rules.rules, self.s, self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_linear(x, self._rules.rules, self.s, self.t, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}"


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class CompacterAdapter(nn.Module):
    """``a + U(act(D a))`` with PHM layers ``down: dim -> bottleneck`` and ``up: bottleneck -> dim``."""

    def __init__(self, dim: int, bottleneck: int, rules: SharedRules, nonlinearity: str = "gelu") -> None:
        super().__init__()
        self.down = PHMLinear(dim, bottleneck, rules)
        self.up = PHMLinear(bottleneck, dim, rules)
        self.nonlinearity = nonlinearity

    def reset_parameters(self, generator: InitSource = None) -> None:
        self.down.reset_parameters(generator)
        self.up.reset_parameters(generator)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """``a + up(act(down(a)))``. A tensor-parallel DTensor ``a`` (``[B, S, D]`` on a 1-D mesh, ``Shard(1)`` or
        ``Replicate()``) is computed on its local tokens and returned with the same shape, mesh and placement."""
        if isinstance(a, DTensor):
            return self._forward_local_tokens(a)
        return a + self.up(_ACTIVATIONS[self.nonlinearity](self.down(a)))

    def _forward_local_tokens(self, a: DTensor) -> DTensor:
        if a.device_mesh.ndim != 1 or not all(p.is_shard(1) or p.is_replicate() for p in a.placements):
            raise ValueError(
                f"compacter: expected a [B, S, D] activation placed Shard(1) or Replicate() on a 1-D tensor-parallel "
                f"mesh, got {a.placements} on a {a.device_mesh.ndim}-D mesh"
            )
        params = [self.down._rules.rules, *self._own_parameters()]
        if a.placements[0].is_shard():
            # Sequence parallelism: each rank's gradient is its tokens' share of the true one.
            params = _gradient_summed_over(a.device_mesh, params)
        # Else every rank holds the same tokens and already computes the whole gradient: nothing to sum.
        rules, down_s, down_t, down_b, up_s, up_t, up_b = params
        x = a.to_local()
        h = _ACTIVATIONS[self.nonlinearity](phm_linear(x, rules, down_s, down_t, down_b))
        y = x + phm_linear(h, rules, up_s, up_t, up_b)
        return DTensor.from_local(
            y, a.device_mesh, a.placements, shape=a.shape, stride=a.stride(), run_check=False
        )

    def _own_parameters(self) -> list[torch.Tensor]:
        return [self.down.s, self.down.t, self.down.bias, self.up.s, self.up.t, self.up.bias]

    def residual_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the adapted sublayer: its output goes through the adapter."""
        return self(output)


def _gradient_summed_over(mesh: DeviceMesh, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` unchanged, read so that their gradients are summed over the 1-D ``mesh`` in the backward: the
    tensors are concatenated and read as a replicated weight with :func:`local_weight` (a ``Partial`` gradient, which
    the backward of ``from_local`` all-reduces), so one all-reduce serves them all."""
    flat = torch.cat([p.reshape(-1) for p in params])
    flat = local_weight(DTensor.from_local(flat, mesh, [Replicate()], run_check=False))
    return [piece.view(p.shape) for piece, p in zip(flat.split([p.numel() for p in params]), params)]


# --- the model transform ------------------------------------------------------------------------------------------


def apply_compacter(model: nn.Module, cfg: CompacterConfig) -> list[str]:
    """Register the shared rules on ``model`` (``compacter_rules.rules``) and an adapter after every adapted sublayer
    (``layers.<i>.attention_adapter``, ``layers.<i>.ffn_adapter``). Returns the adapter module paths. On real
    weights the adapters are initialised at once; on the meta device by :func:`init_adapters` once they exist."""
    dim = model.model_cfg.dim
    k = bottleneck_size(dim, cfg)
    ref = model.tok_embeddings.weight
    rules = SharedRules(cfg.n, device=ref.device, dtype=ref.dtype)
    model.add_module(RULES_MODULE, rules)
    sites = ["ffn"] if cfg.variant == "compacter++" else ["attention", "ffn"]
    paths: list[str] = []
    for i, block in enumerate(model.layers):
        if getattr(block.ffn, "owns_residual", False):
            raise ConfigError(
                "plugins",
                "compacter",
                f"expected blocks whose FFN output joins the residual stream, but layer {i}'s MoE block owns the "
                "residual (moe.block); Compacter cannot wrap it",
            )
        for site in sites:
            adapter = CompacterAdapter(dim, k, rules, cfg.nonlinearity).to(device=ref.device, dtype=ref.dtype)
            block.add_module(ADAPTER_SITES[site], adapter)
            getattr(block, site).register_forward_hook(adapter.residual_hook)
            paths.append(f"layers.{i}.{ADAPTER_SITES[site]}")
    if not ref.is_meta:
        init_adapters(model, cfg)
    return paths


def init_adapters(model: nn.Module, cfg: CompacterConfig) -> None:
    """The shared rules ``N(0, rules_std)`` and every adapter's ``s``/``t`` Glorot-uniform (bias 0), keyed by
    ``cfg.seed`` and the parameter's name: the same values on every rank and layout."""
    init = KeyedInit(cfg.seed, model.named_parameters())
    model.get_submodule(RULES_MODULE).reset_parameters(cfg.rules_std, init)
    for _, adapter in compacter_modules(model):
        adapter.reset_parameters(init)


def compacter_modules(model: nn.Module) -> list[tuple[str, CompacterAdapter]]:
    """``(module path, adapter)`` of every Compacter adapter, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CompacterAdapter)]


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the shared rules and of every adapter parameter."""
    names = [f"{RULES_MODULE}.rules"]
    for path, m in compacter_modules(model):
        names += [f"{path}.{n}" for n, _ in m.named_parameters()]
    return names


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Names of every RMSNorm weight."""
    return [
        f"{path}.{n}"
        for path, m in model.named_modules()
        if isinstance(m, RMSNorm)
        for n, _ in m.named_parameters()
    ]


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: CompacterConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: CompacterConfig = getattr(config, SECTION)
    dim = config.model.dim
    k = bottleneck_size(dim, cfg)
    if k < 1:
        raise ConfigError(
            "compacter.reduction_factor",
            cfg.reduction_factor,
            f"expected at most model.dim={dim} (bottleneck >= 1)",
        )
    if dim % cfg.n or k % cfg.n:
        raise ConfigError(
            "compacter.n",
            cfg.n,
            f"expected a divisor of model.dim={dim} and of the bottleneck k = dim / reduction_factor = {k}; "
            "change compacter.n or compacter.reduction_factor",
        )


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: CompacterConfig = getattr(config, SECTION)
    paths = apply_compacter(model, cfg)
    params = dict(model.named_parameters())
    n_adapter = sum(params[n].numel() for n in adapter_parameter_names(model))
    n_norms = sum(params[n].numel() for n in norm_parameter_names(model)) if cfg.train_norms else 0
    total = sum(p.numel() for p in model.parameters())
    saved = resolve(model, cfg.modules_to_save, SECTION)
    trained = set(trainable_names(saved)) - (set(norm_parameter_names(model)) if cfg.train_norms else set())
    # Norm weights that train_norms already counts are not counted again.
    n_saved = sum(params[n].numel() for n in trained)
    detail, _ = coverage_detail(model, saved)
    console.info(
        f"compacter: {cfg.variant}, {len(paths)} adapters (n={cfg.n}, bottleneck {bottleneck_size(model.model_cfg.dim, cfg)}); "
        f"{n_adapter:,} adapter parameters + {n_norms:,} norm weights"
        f"{f' + {n_saved:,} of {detail}' if saved else ''} trained = "
        f"{100 * (n_adapter + n_norms + n_saved) / max(total, 1):.3f}% of {total:,}"
    )


@hookimpl
def expertrain_init_weights(model: nn.Module, config: JobConfig) -> None:
    init_adapters(model, getattr(config, SECTION))


@hookimpl
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str]:
    cfg: CompacterConfig = getattr(config, SECTION)
    names = adapter_parameter_names(model)
    if cfg.train_norms:
        names += norm_parameter_names(model)
    names += trainable_names(resolve(model, cfg.modules_to_save, SECTION))
    return list(dict.fromkeys(names))


@hookimpl
def expertrain_optimizer_param_groups(model: nn.Module, config: JobConfig) -> list[dict[str, Any]]:
    """The rules and adapters in groups of their own, with the core's weight-decay policy (matrices and the rules
    decay, biases do not). Under tensor parallelism they are plain tensors while the norms are DTensors, and one
    fused AdamW call cannot mix the two; the same groups in every layout keep checkpoints interchangeable."""
    params = dict(model.named_parameters())
    adapter = [params[n] for n in adapter_parameter_names(model)]
    groups = [
        {
            "params": [p for p in adapter if p.ndim >= 2],
            "weight_decay": config.optim.weight_decay,
            "group_name": "compacter_decay",
        },
        {
            "params": [p for p in adapter if p.ndim < 2],
            "weight_decay": 0.0,
            "group_name": "compacter_no_decay",
        },
    ]
    return [g for g in groups if g["params"]]


def adapter_tensors(model: nn.Module, config: JobConfig) -> dict[str, torch.Tensor]:
    """What ``adapter_model.safetensors`` holds: ``compacter_rules.rules [n, n, n]``, per adapter
    ``<path>.{down,up}.{s,t,bias}``, with ``train_norms`` every RMSNorm weight, and the modules trained in full
    (``compacter.modules_to_save``), all under their model names (``output.weight``)."""
    cfg: CompacterConfig = getattr(config, SECTION)
    params = dict(model.named_parameters())
    names = adapter_parameter_names(model)
    if cfg.train_norms:
        names += norm_parameter_names(model)
    tensors = {n: params[n].detach() for n in names}
    tensors.update(native_tensors(model, resolve(model, cfg.modules_to_save, SECTION)))
    return tensors


def adapter_config(model: nn.Module, config: JobConfig) -> dict[str, Any]:
    """What ``adapter_config.json`` holds: the Compacter settings, the adapter paths, the tensor layout and the base."""
    cfg: CompacterConfig = getattr(config, SECTION)
    return {
        "adapter_type": "compacter",
        "paper": "arXiv:2106.04647",
        "mergeable": MERGEABLE,
        **dataclasses.asdict(cfg),
        "bottleneck": bottleneck_size(config.model.dim, cfg),
        "adapters": [path for path, _ in compacter_modules(model)],
        **format_fields(model, resolve(model, cfg.modules_to_save, SECTION), naming="ours"),
        "tensor_layout": {
            "compacter_rules.rules": "[n, n, n]: the shared rules A_i",
            "<adapter>.{down,up}.s": "[n, out/n]",
            "<adapter>.{down,up}.t": "[n, in/n]",
            "weight": "W [out, in] = sum_i kron(A_i, s_i t_i^T); y = W x + bias",
            "adapter": "a + up(act(down(a))) on the output a of layers.<i>.attention / layers.<i>.ffn",
        },
        "base_model": {
            "framework": "expertrain",
            "init_from": config.model.init_from or None,
            "model": dataclasses.asdict(config.model),
            "moe": dataclasses.asdict(config.moe),
        },
    }


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format == "peft":
        raise PluginError(
            "compacter adapters cannot be exported as peft/merged weights (a PHM bottleneck is not a weight delta); "
            "use `expertrain export compacter`"
        )
    if export_format != EXPORT_FORMAT:
        return None
    return write_adapter(output_dir, adapter_tensors(model, config), adapter_config(model, config))


@hookimpl
def expertrain_merge_adapters() -> list[str] | None:
    """Compacter's adapters are nonlinear bottlenecks (their output is not ``ΔW x``): nothing can be merged."""
    raise PluginError(
        "compacter: the adapters are nonlinear PHM bottlenecks, not a weight delta, so they cannot be merged into "
        "the base weights; export them with `expertrain export compacter`"
    )


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    summary["lines"].append(
        f"compacter       {len(compacter_modules(model))} adapters; export them with "
        f"`expertrain export {EXPORT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>`"
    )
