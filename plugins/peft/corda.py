"""CorDA: context-oriented decomposition adaptation (arXiv 2406.05223). Plugin ``corda``.

Every targeted ``nn.Linear`` ``W [out, in]`` becomes a :class:`CorDALinear`, a
:class:`~plugins.peft.low_rank.LoRALinear` whose frozen base is the residual of a context-weighted SVD::

    C   = mean over calibration samples of XᵀX,  X [tokens, in] the layer's input scaled by 1 / max|X| per sample
    C̃   = C + d·mean(diag C)·I,   d = 0.01, doubled until ‖C̃C̃⁻¹ − I‖_F < 0.05
    W C̃ = U S Vᵀ,   V̂ᵀ = Vᵀ C̃⁻¹   (so W = U S V̂ᵀ)
    ipm: the r LARGEST components, kpm: the r SMALLEST;  A₀ = √(S_r/s)·V̂_rᵀ,  B₀ = U_r·√(S_r/s)
    y = (W − s·B₀A₀) x + s·B·A·x,   B = B₀, A = A₀ at step 0, s = alpha / r

so the model is unchanged at step 0 and only ``A`` / ``B`` train. ``B₀`` / ``A₀`` are kept (buffers saved through
the plugin's checkpoint state) for the export on the ORIGINAL base: ``ΔW = s·(BA − B₀A₀)`` as a rank-``2r`` peft LoRA
``B′ = [B | −B₀]``, ``A′ = [A; A₀]`` with alpha ``2·alpha`` (same scale ``s``).

Calibration runs in ``expertrain_after_parallelize`` (skipped when resuming, as the checkpoint holds the result) on
every rank over the same samples (the first ``calibration_samples`` sequences of the calibration data, a
deterministic draw), so the covariances and decompositions are identical on every rank without a collective; the
decomposition uses the whole weight (gathered from FSDP shards) in fp64. Data parallelism (DDP, FSDP2) is supported;
tensor and expert parallelism and ``target_experts`` are refused (per-expert and sharded-input covariances are not
implemented). The reference implementations: peft ``src/peft/tuners/lora/corda.py``, iboing/CorDA
``cordalib/decomposition.py``; peft divides by ``max(X)`` (signed) where the paper card says ``max|X|``, which we use.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from framework.config import ConfigError, JobConfig, option
from framework.hooks import PluginError, hookimpl
from framework.observe import console
from plugins.peft.low_rank import LoRALinear, hf_module_path, peft_key, write_adapter
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    check_target_spec,
    claim,
    format_coverage,
    owned_modules,
    refuse_model_parallel,
    select_targets,
)

SECTION = "corda"
PEFT_FORMAT = "peft"
CORDA_FORMAT = "corda"
CordaMode = Literal["ipm", "kpm"]

DAMP_START = 0.01
INV_TOL = 0.05
MAX_DOUBLINGS = 60


@dataclass
class CorDAConfig:
    """CorDA adapters (arXiv 2406.05223): LoRA initialised from a context-weighted SVD, residual base frozen."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to adapt: a list of module-name suffixes (q_proj, attention.o_proj, ...), a regular expression "
        "matched against whole module paths, or 'all-linear' (every nn.Linear except the LM head).",
    )
    target_experts: bool = option(
        False, doc="Adapt the fused routed experts: not supported by corda (must stay false)."
    )
    r: int = option(8, doc="Rank of every adapter (components adapted per layer).", min=1)
    alpha: float = option(8.0, doc="Alpha: the delta is scaled by alpha / r.", min=0.0, min_exclusive=True)
    mode: CordaMode = option(
        "ipm",
        doc="ipm (instruction-previewed: adapt the r largest components; calibrate on the task's data) or kpm "
        "(knowledge-preserved: adapt the r smallest; calibrate on data whose knowledge must be kept).",
    )
    calibration_paths: list[str] = option(
        default_factory=list,
        doc="Indexed dataset prefixes (expertrain data prepare) to calibrate on; empty = the job's data section "
        "(the embedded corpus by default).",
    )
    calibration_samples: int = option(256, doc="Calibration sequences.", min=1)
    calibration_seq_len: int = option(0, doc="Tokens per calibration sequence; 0 = data.seq_len.", min=0)
    calibration_batch_size: int = option(8, doc="Sequences per calibration forward.", min=1)
    seed: int = option(0, doc="Seed of the calibration sample draw (the same on every rank).", min=0)


# --- the adapted module -------------------------------------------------------------------------------------------


class CorDALinear(LoRALinear):
    """A :class:`LoRALinear` on the residual base ``W − s·B₀A₀`` that also keeps ``B₀ [out, r]`` / ``A₀ [r, in]``
    (non-persistent buffers ``lora_B0`` / ``lora_A0``: the plugin saves them) for the export on the original base."""

    lora_A0: torch.Tensor
    lora_B0: torch.Tensor

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__(base, r, alpha)
        w = base.weight
        self.register_buffer("lora_A0", torch.zeros(r, self.in_features, device=w.device), persistent=False)
        self.register_buffer("lora_B0", torch.zeros(self.out_features, r, device=w.device), persistent=False)


def corda_modules(model: nn.Module) -> list[tuple[str, CorDALinear]]:
    """``(module path, module)`` of every module the plugin adapted, in model order."""
    return owned_modules(model, SECTION, CorDALinear)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every trainable adapter tensor."""
    return [f"{p}.lora.{t}" for p, _ in corda_modules(model) for t in ("lora_A", "lora_B")]


def apply_corda(model: nn.Module, cfg: CorDAConfig) -> Targets:
    """Wrap every targeted linear (in place) in a :class:`CorDALinear` with zero adapters: the model is unchanged
    until :func:`calibrate_and_init` decomposes the weights."""
    if cfg.target_experts:
        _refuse_experts()
    targets = select_targets(model, cfg.targets, False, section=SECTION)
    for path, base in targets.linears:
        if min(base.in_features, base.out_features) < cfg.r:
            raise ConfigError(
                f"{SECTION}.r", cfg.r, f"expected at most min(out, in) = {min(base.weight.shape)} for {path}"
            )
        claim(base, SECTION, path)
        module = CorDALinear(base, cfg.r, cfg.alpha)
        claim(module, SECTION, path)
        model.set_submodule(path, module)
    return targets


def _refuse_experts() -> None:
    raise ConfigError(
        f"{SECTION}.target_experts",
        True,
        "expected false: corda does not adapt fused routed experts (per-expert covariances are not implemented); "
        "adapt them with plugin 'lora' (disjoint targets) or leave them frozen",
    )


# --- the math -----------------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """``W = U·diag(S)·V̂ᵀ`` from ``SVD(W C̃)``; ``damping`` is the final ``d`` and ``C̃⁻¹`` its inverse."""

    U: torch.Tensor
    S: torch.Tensor
    Vhat_T: torch.Tensor
    damping: float


def damped_inverse(C: torch.Tensor, tol: float = INV_TOL) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C̃, C̃⁻¹, d)``: ``C̃ = C + d·mean(diag C)·I`` with ``d`` from 0.01, doubled until
    ``‖C̃C̃⁻¹ − I‖_F < tol`` (0.05: the reference's invertibility test). Computed in ``C``'s dtype (use fp64)."""
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    mean_diag = torch.diagonal(C).mean()
    if not mean_diag > 0:
        raise ValueError("the calibration covariance is zero: the layer saw no non-zero input")
    d = DAMP_START
    for _ in range(MAX_DOUBLINGS):
        C_damped = C + d * mean_diag * eye
        inv, info = torch.linalg.inv_ex(C_damped)
        if info == 0 and torch.dist(C_damped @ inv, eye) < tol:
            return C_damped, inv, d
        d *= 2
    raise ValueError(f"the calibration covariance stayed singular after damping with d = {d:g}")


def decompose(W: torch.Tensor, C: torch.Tensor) -> Decomposition:
    """Context-oriented SVD of ``W [out, in]`` with the input covariance ``C [in, in]`` (both cast to fp64)."""
    W, C = W.double(), C.double()
    C_damped, C_inv, d = damped_inverse(C)
    U, S, Vh = torch.linalg.svd(W @ C_damped, full_matrices=False)
    return Decomposition(U, S, Vh @ C_inv, d)


def corda_factors(
    dec: Decomposition, r: int, mode: CordaMode, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B₀ [out, r], A₀ [r, in])``: ``B₀ = U_r·√(S_r/s)``, ``A₀ = √(S_r/s)·V̂_rᵀ`` of the ``r`` largest (ipm) or
    smallest (kpm) components, so ``s·B₀A₀ = U_r S_r V̂_rᵀ``."""
    idx = slice(0, r) if mode == "ipm" else slice(dec.S.shape[0] - r, dec.S.shape[0])
    root = torch.sqrt(dec.S[idx] / scaling)
    return dec.U[:, idx] * root, root[:, None] * dec.Vhat_T[idx]


class CovarianceCollector:
    """Accumulates per target module ``Σ_samples X̄ᵀX̄`` with ``X̄ = X / max|X|`` per sample, in fp64, from
    forward pre-hooks; :meth:`covariances` averages over the samples seen."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(path)) for path, m in modules]

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            x_BTD = x.reshape(x.shape[0], -1, x.shape[-1])  # one calibration sample per leading index
            peak_B = x_BTD.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
            x_BTD = x_BTD / peak_B[:, None, None]
            cov = torch.einsum("bti,btj->ij", x_BTD, x_BTD)
            self.sums[path] = self.sums[path] + cov if path in self.sums else cov
            self.samples[path] = self.samples.get(path, 0) + x_BTD.shape[0]

        return hook

    def covariances(self) -> dict[str, torch.Tensor]:
        return {p: s / self.samples[p] for p, s in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_covariances(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``model`` on every ``input_ids`` batch and return each adapted module's covariance ``C`` (fp64)."""
    collector = CovarianceCollector(corda_modules(model))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids)
    finally:
        collector.remove()
        model.train(was_training)
    return collector.covariances()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def _write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` (plain, or a DTensor shard of it) to the whole tensor ``value`` (the same on every rank)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)


@torch.no_grad()
def calibrate_and_init(model: nn.Module, batches: list[torch.Tensor], cfg: CorDAConfig) -> dict[str, float]:
    """Collect the covariances over ``batches``, decompose every adapted weight and set ``B = B₀``, ``A = A₀`` and
    the base to ``W − s·B₀A₀``. Returns the damping ``d`` per module path."""
    covariances = collect_covariances(model, batches)
    damping: dict[str, float] = {}
    for path, m in corda_modules(model):
        if path not in covariances:
            raise PluginError(f"corda: module {path} received no input during calibration")
        W = _full(m.weight)
        dec = decompose(W, covariances[path].to(W.device))
        B0, A0 = corda_factors(dec, m.lora.r, cfg.mode, m.lora.scaling)
        residual = W.double() - m.lora.scaling * (B0 @ A0)
        _write_full(m.weight, residual.to(W.dtype))
        _write_full(m.lora.lora_A, A0.to(m.lora.lora_A.dtype))
        _write_full(m.lora.lora_B, B0.to(m.lora.lora_B.dtype))
        m.lora_A0.copy_(A0)
        m.lora_B0.copy_(B0)
        damping[path] = dec.damping
    return damping


def calibration_batches(config: JobConfig) -> list[torch.Tensor]:
    """The calibration ``input_ids`` batches: the first ``calibration_samples`` sequences (``calibration_seq_len``
    tokens) of ``corda.calibration_paths`` or of the job's ``data`` section, drawn with ``corda.seed``."""
    from framework.data.pretrain import build_pretrain_datasets, load_tokenizer, split_inputs_labels

    cfg: CorDAConfig = getattr(config, SECTION)
    data_cfg = config.data
    if cfg.calibration_paths:
        data_cfg = dataclasses.replace(data_cfg, paths=list(cfg.calibration_paths), weights=[])
    data_cfg = dataclasses.replace(data_cfg, val_fraction=0.0)
    seq_len = cfg.calibration_seq_len or config.data.seq_len
    tokenizer = load_tokenizer(data_cfg, progress=False)
    train, _ = build_pretrain_datasets(data_cfg, seq_len, cfg.seed, cfg.calibration_samples, 0, tokenizer)
    ids = torch.stack([split_inputs_labels(train[i])[0] for i in range(cfg.calibration_samples)])
    return list(ids.split(cfg.calibration_batch_size))


# --- export -------------------------------------------------------------------------------------------------------


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as a rank-``2r`` peft LoRA on the ORIGINAL base: ``lora_B = [B | −B₀]``, ``lora_A = [A; A₀]``
    (with alpha doubled, ``2α/2r = α/r``, this is ``s·(BA − B₀A₀)``)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        hf = hf_module_path(path)
        A, B = _full(m.lora.lora_A).detach().float(), _full(m.lora.lora_B).detach().float()
        tensors[peft_key(hf, "lora_A")] = torch.cat([A, m.lora_A0.float()], dim=0)
        tensors[peft_key(hf, "lora_B")] = torch.cat([B, -m.lora_B0.float()], dim=1)
    return tensors


def peft_adapter_config(model: nn.Module, config: JobConfig) -> dict[str, Any]:
    """``adapter_config.json`` of :func:`peft_tensors`: a plain peft LoRA of rank ``2r`` and alpha ``2α`` on the
    adapted modules (exact transformers paths)."""
    cfg: CorDAConfig = getattr(config, SECTION)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.model.init_from or None,
        "r": 2 * cfg.r,
        "lora_alpha": 2 * cfg.alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": sorted(hf_module_path(p) for p, _ in corda_modules(model)),
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
    }


def write_corda(model: nn.Module, config: JobConfig, output_dir: Path) -> list[str]:
    """``expertrain export corda``: ``corda_adapter.safetensors`` (per module ``<path>.lora_A`` / ``lora_B`` (the
    trained adapter on the residual base) and ``lora_A0`` / ``lora_B0`` (its initial value)) and
    ``corda_config.json`` (mode, r, alpha, scale, module paths)."""
    cfg: CorDAConfig = getattr(config, SECTION)
    tensors: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        for name, t in (
            ("lora_A", m.lora.lora_A),
            ("lora_B", m.lora.lora_B),
            ("lora_A0", m.lora_A0),
            ("lora_B0", m.lora_B0),
        ):
            tensors[f"{path}.{name}"] = _full(t).detach().to("cpu").contiguous().clone()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "corda_adapter.safetensors"), metadata={"format": "expertrain-corda"})
    meta = {
        "method": "corda",
        "mode": cfg.mode,
        "r": cfg.r,
        "alpha": cfg.alpha,
        "scaling": cfg.alpha / cfg.r,
        "modules": [p for p, _ in corda_modules(model)],
        "base_model": config.model.init_from or None,
        "delta": "scaling * (lora_B @ lora_A - lora_B0 @ lora_A0) on the original base",
    }
    (out / "corda_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["corda_adapter.safetensors", "corda_config.json"]


@torch.no_grad()
def merge_corda(model: nn.Module) -> list[str]:
    """Fold ``s·B·A`` into every residual base and put a plain ``nn.Linear`` back in place of each adapter."""
    merged = []
    for path, m in corda_modules(model):
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        model.set_submodule(path, plain)
        merged.append(path)
    return merged


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: CorDAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: CorDAConfig = getattr(config, SECTION)
    if cfg.target_experts:
        _refuse_experts()
    refuse_model_parallel(
        config, SECTION, "its calibration needs each layer's whole input and weight on every rank"
    )
    check_target_spec(SECTION, cfg.targets)
    seq_len = cfg.calibration_seq_len or config.data.seq_len
    if seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"{SECTION}.calibration_seq_len",
            seq_len,
            f"expected at most model.max_seq_len={config.model.max_seq_len}",
        )


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: CorDAConfig = getattr(config, SECTION)
    targets = apply_corda(model, cfg)
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in adapter_parameter_names(model))
    detail = f"mode={cfg.mode}, r={cfg.r}, alpha={cfg.alpha:g}, {cfg.calibration_samples} calibration samples"
    console.info(format_coverage(SECTION, model, targets, trainable, detail))


@hookimpl
def expertrain_trainable_parameters(model: nn.Module) -> list[str]:
    return adapter_parameter_names(model)


@hookimpl
def expertrain_after_parallelize(model: nn.Module, config: JobConfig, resumed: bool) -> None:
    if resumed:
        return  # the checkpoint holds the residual bases, the adapters and B₀ / A₀
    damping = calibrate_and_init(model, calibration_batches(config), getattr(config, SECTION))
    worst = max(damping.values(), default=DAMP_START)
    console.info(f"corda: decomposed {len(damping)} modules; largest damping d = {worst:g}")


@hookimpl
def expertrain_state_dict(model: nn.Module) -> dict[str, Any] | None:
    state: dict[str, Any] = {}
    for path, m in corda_modules(model):
        state[f"{path}.lora_A0"] = m.lora_A0
        state[f"{path}.lora_B0"] = m.lora_B0
    return state or None


@hookimpl
def expertrain_load_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    modules = dict(corda_modules(model))
    expected = {f"{p}.{t}" for p in modules for t in ("lora_A0", "lora_B0")}
    if set(state) != expected:
        raise PluginError(
            "corda: the checkpoint's adapted modules differ from this job's (corda.targets or the model changed); "
            "restore them or start a new run directory"
        )
    with torch.no_grad():
        for key, value in state.items():
            path, _, name = key.rpartition(".")
            getattr(modules[path], name).copy_(value)


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format == CORDA_FORMAT:
        return write_corda(model, config, output_dir)
    if export_format != PEFT_FORMAT:
        return None
    if "lora" in config.plugins:
        raise PluginError(
            "corda: `expertrain export peft` of a job with both 'lora' and 'corda' would write two adapters to one "
            "file; export 'corda' (and the lora adapters separately) instead"
        )
    return write_adapter(output_dir, peft_tensors(model), peft_adapter_config(model, config))


@hookimpl
def expertrain_merge_adapters(model: nn.Module) -> list[str] | None:
    return merge_corda(model) or None


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    summary["lines"].append(
        f"corda           {len(corda_modules(model))} adapted modules; export on the original base with "
        f"`expertrain export {PEFT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>`"
    )


__all__ = [
    "CorDAConfig",
    "CorDALinear",
    "Decomposition",
    "adapter_parameter_names",
    "apply_corda",
    "calibrate_and_init",
    "calibration_batches",
    "collect_covariances",
    "corda_factors",
    "corda_modules",
    "damped_inverse",
    "decompose",
    "merge_corda",
    "peft_adapter_config",
    "peft_tensors",
    "write_corda",
]
