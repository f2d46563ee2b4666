"""Low-rank adapters (LoRA, Hu et al. 2021): the one implementation the PEFT and MoE-adapter plugins share.

A LoRA adapter adds ``ΔW = s·B·A`` to a frozen weight ``W [out, in]``: ``A [r, in]``, ``B [out, r]``, scale
``s = α/r`` (rsLoRA: ``α/√r``), so ``y = W x + s·B·A·dropout(x)``. ``B`` starts at zero, so an adapter changes
nothing until it is trained. Two shapes of adapter live here:

- :class:`LinearLoRA`: one adapter on an ``nn.Linear`` (``lora_A [r, in]``, ``lora_B [out, r]``);
- :class:`ExpertsLoRA`: one adapter per routed expert of our fused expert weights (``lora_A [E, r, in]``,
  ``lora_B [E, out, r]``). ``gate_up_proj [E, 2, I, H]`` is adapted as the ``[E, 2I, H]`` matrix it is in memory
  (gate rows first), ``down_proj [E, H, I]`` as is.

Both modules compute only the *delta*; the owner adds it to the base projection's output (or merges it into the
base weight with :func:`merge_` / :func:`unmerge_`). Two owners live here too, for every LoRA-shaped plugin:

- :class:`LoRALinear`: an ``nn.Linear`` (same ``weight`` / ``bias`` Parameters, so names are unchanged) plus a
  :class:`LinearLoRA` child ``lora``; it declares how tensor parallelism places the adapter
  (:meth:`LoRALinear.tensor_parallel_placements`);
- :class:`LoRAExperts`: a :class:`~framework.models.moe.experts.GroupedExperts` whose fused weights get per-expert
  deltas (children ``lora_gate_up_proj`` / ``lora_down_proj``), added to the weights at every forward as peft's
  ``target_parameters`` does; it declares the adapters as per-expert parameters, so expert parallelism cuts them
  with their experts (:meth:`LoRAExperts.per_expert_parameters`). Tensors are drawn on the CPU in fp32 from an explicit
generator (like :mod:`framework.models.init`), so every rank and every device gets the same initial adapter.

peft interop (the on-disk contract of ``adapter_model.safetensors``): keys are
``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(:func:`peft_key`). For 3-D expert weights peft's ``target_parameters`` layout flattens the experts into the rank:
``lora_A [E·r, in]`` with expert-major rows (rows ``e·r … e·r+r-1`` are expert ``e``) and ``lora_B [out, r·E]`` with
*rank-major* columns (column ``j·E + e`` is rank ``j`` of expert ``e``), which is how peft's ``ParamWrapper``
reshapes them (``A.reshape(E, r, in)``, ``B.reshape(out, r, E)``). :func:`experts_to_peft` /
:func:`experts_from_peft` convert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from framework.checkpoint.stream import DeferredTensor, save_safetensors
from framework.models.init import InitSource, normal_, uniform_
from framework.models.moe import EXPERT_IMPLS, GroupedExperts, resolve_impl
from framework.models.sharding import local_weight
from plugins.peft.targets import owned_modules

LoRAInit = Literal["kaiming", "gaussian"]
"""``kaiming``: ``A`` Kaiming-uniform with ``a=√5`` (the ``nn.Linear`` default, bound ``1/√in``); ``gaussian``:
``A ~ N(0, (1/r)²)`` (peft's ``init_lora_weights="gaussian"``, std ``1/r``). ``B = 0`` either way."""

PEFT_PREFIX = "base_model.model."


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The adapter scale ``s``: ``α/r``, or ``α/√r`` for rank-stabilised LoRA (Kalajdzievski 2023)."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def linear_init_(weight: torch.Tensor, generator: InitSource = None) -> torch.Tensor:
    """Fill ``weight [..., out, in]`` in place like ``nn.Linear``'s default init of every ``[out, in]`` matrix:
    Kaiming-uniform with ``a=√5``, i.e. ``U(-1/√in, 1/√in)``, drawn in fp32 on the CPU from ``generator``."""
    # Computed here because torch's fan-in of a 3-D tensor would count the expert axis as receptive field.
    bound = 1.0 / math.sqrt(weight.shape[-1])
    return uniform_(weight, -bound, bound, generator)


@torch.no_grad()
def init_lora_(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    init: LoRAInit = "kaiming",
    generator: InitSource = None,
) -> None:
    """Initialise ``A [..., r, in]`` in place (every ``[r, in]`` slice like its own ``nn.Linear(in, r)``) and zero
    ``B [..., out, r]``, so ``ΔW = 0``. Values are drawn in fp32 on the CPU from ``generator`` and copied over."""
    if init == "kaiming":
        linear_init_(lora_A, generator)
    elif init == "gaussian":
        normal_(lora_A, 1.0 / lora_A.shape[-2], generator)
    else:
        raise ValueError(f"unknown LoRA init {init!r}; expected 'kaiming' or 'gaussian'")
    lora_B.zero_()


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = s·B·A``: ``A [r, in]``, ``B [out, r]`` -> ``[out, in]``; batched ``[E, r, in]``, ``[E, out, r]`` ->
    ``[E, out, in]``."""
    return scaling * (lora_B @ lora_A)


@torch.no_grad()
def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """``W += s·B·A`` in place. ``weight`` may be any shape with ``ΔW``'s elements in the same memory order, e.g.
    the fused ``gate_up_proj [E, 2, I, H]`` for a delta of ``[E, 2I, H]``. Holds one ``ΔW`` beside the weight
    (scaled in place: the bits of :func:`delta_weight`)."""
    delta = (lora_B.float() @ lora_A.float()).mul_(scaling)
    weight.add_(delta.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """Undo :func:`merge_`: ``W -= s·B·A`` (exact up to fp round-off of the base weight's dtype)."""
    delta = delta_weight(lora_A.float(), lora_B.float(), scaling)
    weight.sub_(delta.reshape(weight.shape).to(weight.dtype))


class _LoRADelta(nn.Module):
    """What every LoRA delta shares: ``lora_A``, ``lora_B``, ``scaling``, init, ``ΔW`` and merge/unmerge."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float

    def reset_parameters(self, init: LoRAInit = "kaiming", generator: InitSource = None) -> None:
        """``A`` per ``init`` (every expert's, when stacked), ``B = 0``."""
        init_lora_(self.lora_A, self.lora_B, init, generator)

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A``: ``[out, in]``, or ``[E, out, in]`` for stacked experts."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling)

    def merge_into(self, weight: torch.Tensor) -> None:
        """``weight += s·B·A`` (for experts ``[E, out, in]`` or a view-compatible fused shape such as
        ``[E, 2, I, H]``)."""
        merge_(weight, self.lora_A, self.lora_B, self.scaling)

    def unmerge_from(self, weight: torch.Tensor) -> None:
        """``weight -= s·B·A``."""
        unmerge_(weight, self.lora_A, self.lora_B, self.scaling)


class LinearLoRA(_LoRADelta):
    """The LoRA delta of one linear layer: ``forward(x [..., in]) -> s·B·A·dropout(x) [..., out]``.

    Parameters ``lora_A [r, in]`` and ``lora_B [out, r]`` (peft's names and shapes). Add the result to the base
    layer's output, or :meth:`merge_into` the base weight for inference.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = lora_scaling(r, alpha, rslora)
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class ExpertsLoRA(_LoRADelta):
    """One LoRA delta per routed expert of a fused expert weight ``[E, out, in]``.

    ``forward(x_ND, tokens_per_expert_E)`` takes rows grouped by expert (expert 0's rows first, the layout
    :class:`~framework.models.moe.experts.GroupedExperts` computes on) and returns ``s·B_e·A_e·dropout(x)`` for every
    row ``[N, out]``. Parameters ``lora_A [E, r, in]``, ``lora_B [E, out, r]``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.r = (
            num_experts,
            in_features,
            out_features,
            r,
        )
        self.scaling = lora_scaling(r, alpha, rslora)
        self.lora_A = nn.Parameter(torch.zeros(num_experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # One small matmul pair per expert over its contiguous rows (r is small: the adapter is a fraction of the
        # expert's own work). The split sizes need the counts on the host.
        x_ND = self.dropout(x_ND)
        chunks = torch.split(x_ND, tokens_per_expert_E.tolist())
        out = [x @ self.lora_A[e].T @ self.lora_B[e].T for e, x in enumerate(chunks)]
        return self.scaling * torch.cat(out)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}"
        )


# --- adapted modules ----------------------------------------------------------------------------------------------


def _require_local(*tensors: torch.Tensor) -> None:
    if any(isinstance(t, DTensor) for t in tensors):
        raise RuntimeError(
            "merge/unmerge need the whole weights in one process (e.g. a model rebuilt by `expertrain export`), "
            "not a tensor- or expert-parallel shard"
        )


class LoRALinear(nn.Linear):
    """``y = W x + b + s·B·A·dropout(x)``: an ``nn.Linear`` that takes over ``base``'s ``weight`` / ``bias``
    Parameters (their names in the model are unchanged) and adds a :class:`LinearLoRA` child ``lora``.

    :meth:`merge` folds ``s·B·A`` into ``weight`` (the forward then skips the adapter); :meth:`unmerge` undoes it.
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's, not a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora = LinearLoRA(
            self.in_features, self.out_features, r, alpha, dropout, rslora, device=w.device, dtype=w.dtype
        )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """``W += s·B·A`` once (a no-op when already merged)."""
        if not self.merged:
            _require_local(self.weight)
            self.lora.merge_into(self.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= s·B·A`` (a no-op when not merged)."""
        if self.merged:
            _require_local(self.weight)
            self.lora.unmerge_from(self.weight)
            self.merged = False

    @staticmethod
    def tensor_parallel_placements(style: str) -> dict[str, Placement]:
        """Where tensor parallelism puts the adapter, by the base layer's style: column-parallel (``W``
        ``Shard(0)``): ``B`` sharded on its output rows, ``A`` replicated; row-parallel (``W`` ``Shard(1)``): ``A``
        sharded on its input columns, ``B`` replicated (its input, ``A x``, is then a partial sum like ``W x``)."""
        if style == "colwise":
            return {"lora.lora_A": Replicate(), "lora.lora_B": Shard(0)}
        if style == "rowwise":
            return {"lora.lora_A": Shard(1), "lora.lora_B": Replicate()}
        raise ValueError(f"unknown tensor-parallel style {style!r}; expected 'colwise' or 'rowwise'")


class LoRAExperts(GroupedExperts):
    """Routed experts whose fused weights carry per-expert LoRA deltas: ``W_e + s·B_e·A_e`` for ``gate_up_proj``
    (as ``[E, 2I, H]``) and/or ``down_proj`` (``[E, H, I]``).

    Takes over ``base``'s weight Parameters (names unchanged) and adds :class:`ExpertsLoRA` children
    ``lora_gate_up_proj`` / ``lora_down_proj`` (``None`` when that weight is not adapted). The deltas are added to
    the weights at each forward, then any expert kernel runs unchanged (what peft's ``target_parameters`` does; the
    extra work is one ``[E, out, in]`` delta per weight and step, small next to the tokens' matmuls). Under expert
    parallelism the adapters hold this rank's experts; under expert tensor parallelism each rank uses the slice of
    ``B`` (gate/up) or ``A`` (down) that matches its part of the hidden dimension.
    """

    def __init__(
        self,
        base: GroupedExperts,
        lora_gate_up_proj: ExpertsLoRA | None = None,
        lora_down_proj: ExpertsLoRA | None = None,
    ) -> None:
        self.init_from_base(base)  # not GroupedExperts.__init__: the weights are the base module's
        E, hidden, H = base.num_experts, base.hidden, base.dim
        for name, lora, shape in (
            ("lora_gate_up_proj", lora_gate_up_proj, (E, 2 * hidden, H)),
            ("lora_down_proj", lora_down_proj, (E, H, hidden)),
        ):
            if lora is not None and (lora.num_experts, lora.out_features, lora.in_features) != shape:
                raise ValueError(
                    f"{name} adapts [experts, out, in] = {list(shape)}, got "
                    f"{[lora.num_experts, lora.out_features, lora.in_features]}"
                )
        self.lora_gate_up_proj = lora_gate_up_proj
        self.lora_down_proj = lora_down_proj
        self.merged = False

    def adapters(self) -> dict[str, ExpertsLoRA]:
        """``{weight name: adapter}`` of the adapted fused weights (``gate_up_proj`` first)."""
        pairs = (("gate_up_proj", self.lora_gate_up_proj), ("down_proj", self.lora_down_proj))
        return {name: lora for name, lora in pairs if lora is not None}

    def per_expert_parameters(self) -> list[str]:
        """Parameters besides the fused weights whose dim 0 is the expert axis (all adapter tensors): expert
        parallelism cuts them like the weights; over tensor parallelism they stay whole (replicated)."""
        return [f"lora_{name}.{t}" for name in self.adapters() for t in ("lora_A", "lora_B")]

    def _hidden_slice(self, local_hidden: int) -> slice:
        """This rank's columns of the hidden dimension ``I`` (all of them unless expert tensor parallelism split it)."""
        w = self.down_proj
        if isinstance(w, DTensor):
            for mesh_dim, placement in enumerate(w.placements):
                if placement.is_shard(2):
                    start = w.device_mesh.get_local_rank(mesh_dim) * local_hidden
                    return slice(start, start + local_hidden)
        return slice(None)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        fn = EXPERT_IMPLS[resolve_impl(self.impl, x_ND.device)]
        w_gate_up_E2IH = local_weight(self.gate_up_proj)
        w_down_EHI = local_weight(self.down_proj)
        if not self.merged:
            cols = self._hidden_slice(w_down_EHI.shape[-1])
            if self.lora_gate_up_proj is not None:
                lora = self.lora_gate_up_proj
                A_ERH = local_weight(lora.lora_A)
                B_E2IR = local_weight(lora.lora_B).unflatten(1, (2, -1))[:, :, cols]
                delta_E2IH = lora.scaling * (B_E2IR.flatten(1, 2) @ A_ERH)
                w_gate_up_E2IH = w_gate_up_E2IH + delta_E2IH.view_as(w_gate_up_E2IH)
            if self.lora_down_proj is not None:
                lora = self.lora_down_proj
                A_ERI = local_weight(lora.lora_A)[:, :, cols]
                w_down_EHI = w_down_EHI + lora.scaling * (local_weight(lora.lora_B) @ A_ERI)
        return fn(x_ND, w_gate_up_E2IH.flatten(1, 2), w_down_EHI, tokens_per_expert_E)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every expert's delta into the fused weights once (a no-op when already merged)."""
        if not self.merged:
            for name, lora in self.adapters().items():
                _require_local(getattr(self, name))
                lora.merge_into(getattr(self, name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the deltas again (a no-op when not merged)."""
        if self.merged:
            for name, lora in self.adapters().items():
                _require_local(getattr(self, name))
                lora.unmerge_from(getattr(self, name))
            self.merged = False


@torch.no_grad()
def merge_into_tensor(model: nn.Module, plugin: str, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """A streamed merge (``expertrain_merge_tensor``): fold the LoRA adapter ``plugin`` put on base tensor ``name``
    (a :class:`LoRALinear`'s ``weight`` or a :class:`LoRAExperts`' fused weight) into ``tensor``, in place, with
    the arithmetic of the modules' own ``merge``; ``None`` when ``plugin`` adapted nothing of ``name``."""
    path, _, weight = name.rpartition(".")
    module = dict(owned_modules(model, plugin, (LoRALinear, LoRAExperts))).get(path)
    if isinstance(module, LoRALinear) and weight == "weight":
        module.lora.merge_into(tensor)
        return tensor
    if isinstance(module, LoRAExperts) and weight in module.adapters():
        module.adapters()[weight].merge_into(tensor)
        return tensor
    return None


# --- peft on-disk format ------------------------------------------------------------------------------------------


def peft_key(module_path: str, tensor: str) -> str:
    """``base_model.model.<module path>.<tensor>.weight``, e.g. ``peft_key("layers.0.attention.q_proj", "lora_A")``.

    No adapter name appears in the key (peft adds ``.default`` only in memory)."""
    return f"{PEFT_PREFIX}{module_path}.{tensor}.weight"


def hf_module_path(path: str) -> str:
    """Our module path -> the transformers one (Llama / Mixtral / Qwen-MoE naming), e.g.
    ``layers.0.attention.q_proj`` -> ``model.layers.0.self_attn.q_proj``, ``layers.1.ffn.experts`` ->
    ``model.layers.1.mlp.experts``, ``output`` -> ``lm_head``.

    The one place plugins/peft renames modules; it can delegate to the HF interop mapping once that exists."""
    top = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
    if path in top:
        return top[path]
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "layers":
        raise ValueError(f"no transformers name for module path {path!r}")
    inner = {
        "attention": "self_attn",
        "ffn": "mlp",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    rest = parts[3:]
    if parts[2] == "ffn" and rest[:2] == ["router", "gate"]:  # our router's Linear is the HF MoE block's gate
        rest = ["gate", *rest[2:]]
    return ".".join(["model", "layers", parts[1], inner.get(parts[2], parts[2]), *rest])


def peft_param_wrapper_paths(module_path: str, param_names: list[str]) -> dict[str, str]:
    """Where peft stores the adapters of several ``target_parameters`` of one module: it wraps the module once per
    parameter, the first parameter (in the module's declaration order) innermost, so every wrapper but the outermost
    adds a ``base_layer`` level: for ``[gate_up_proj, down_proj]`` of ``<p>``, ``gate_up_proj`` ->
    ``<p>.base_layer`` and ``down_proj`` -> ``<p>``."""
    n = len(param_names)
    return {name: module_path + ".base_layer" * (n - 1 - j) for j, name in enumerate(param_names)}


def experts_to_peft(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-expert ``A [E, r, in]``, ``B [E, out, r]`` -> peft's ``A [E·r, in]`` (expert-major rows) and
    ``B [out, r·E]`` (rank-major columns: column ``j·E + e``)."""
    E, r, d_in = lora_A.shape
    peft_A = lora_A.reshape(E * r, d_in)
    peft_B = lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], r * E)  # [out, r, E] -> [out, r·E]
    return peft_A.contiguous(), peft_B.contiguous()


def deferred_experts_to_peft(
    lora_A: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor, DeferredTensor]:
    """:func:`experts_to_peft` for a file written by :func:`write_adapter`: ``A [E·r, in]`` (a view of ``lora_A``)
    and ``B [out, r·E]`` made only when it is written (its permuted copy is the only one held at a time)."""
    E, out, r = lora_B.shape
    return lora_A.reshape(E * r, lora_A.shape[2]), DeferredTensor(
        lora_B.dtype, (out, r * E), lambda: experts_to_peft(lora_A, lora_B)[1]
    )


def experts_from_peft(
    peft_A: torch.Tensor, peft_B: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`experts_to_peft`: ``A [E·r, in]``, ``B [out, r·E]`` -> ``A [E, r, in]``, ``B [E, out, r]``."""
    if peft_A.shape[0] % num_experts or peft_B.shape[1] != peft_A.shape[0]:
        raise ValueError(
            f"peft expert adapter shapes {tuple(peft_A.shape)} / {tuple(peft_B.shape)} do not fit "
            f"{num_experts} experts"
        )
    r = peft_A.shape[0] // num_experts
    lora_A = peft_A.reshape(num_experts, r, peft_A.shape[1])
    lora_B = peft_B.reshape(peft_B.shape[0], r, num_experts).permute(2, 0, 1)
    return lora_A.contiguous(), lora_B.contiguous()


def write_adapter(
    output_dir: str | Path,
    tensors: Mapping[str, torch.Tensor | DeferredTensor],
    adapter_config: Mapping[str, Any],
) -> list[str]:
    """Write ``adapter_model.safetensors`` (contiguous CPU copies of ``tensors``) and ``adapter_config.json`` into
    ``output_dir``; returns the two file names."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One tensor at a time (save_file's bytes without its two copies of every tensor).
    save_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(dict(adapter_config), indent=2) + "\n", encoding="utf-8"
    )
    return ["adapter_model.safetensors", "adapter_config.json"]
