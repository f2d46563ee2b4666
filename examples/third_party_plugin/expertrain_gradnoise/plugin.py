"""Annealed Gaussian gradient noise (Neelakantan et al., 2015): ``g += N(0, sigma_t^2)``, ``sigma_t^2 = eta/(1+t)^gamma``.

Registered under the entry-point group ``expertrain.plugins`` as ``gradnoise``; enabled with ``plugins: [gradnoise]``.

The noise of a parameter at a step is drawn from a private generator seeded by ``(seed, step, parameter name)``, so
every data-parallel rank adds exactly the same noise to its (already all-reduced, identical) gradients. Drawing from
the global RNG instead would give each rank different noise and the replicas would silently drift apart.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from framework.config import option
from framework.hooks import hookimpl

log = logging.getLogger("expertrain_gradnoise")

SECTION = "gradnoise"


@dataclass
class GradNoiseConfig:
    """Annealed Gaussian gradient noise."""

    eta: float = option(
        0.01, doc="Initial noise variance eta (the paper uses 0.01, 0.3 or 1.0); 0 = off.", min=0.0
    )
    gamma: float = option(0.55, doc="Annealing exponent gamma: variance eta / (1 + t)^gamma.", min=0.0)
    seed: int = option(
        0, doc="Noise seed; with the step and parameter name it fixes the noise on every rank.", min=0
    )


def sigma(step: int, eta: float, gamma: float) -> float:
    """Noise standard deviation at the 1-based optimizer step ``step`` (t = step - 1 counts from 0, as in the paper)."""
    t = step - 1
    return math.sqrt(eta / (1.0 + t) ** gamma)


def noise_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit generator seed from (seed, step, parameter name), identical in every process (no ``hash()``)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + zlib.crc32(name.encode())) & (
        (1 << 64) - 1
    )
    mixed ^= mixed >> 31
    return mixed & ((1 << 63) - 1)


def _full_noise(grad: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Noise of the *logical* shape of ``grad`` in float32, from a private generator on the gradient's device."""
    generator = torch.Generator(device=grad.device)
    generator.manual_seed(seed)
    return torch.randn(tuple(grad.shape), generator=generator, device=grad.device, dtype=torch.float32).mul_(
        std
    )


@torch.no_grad()
def add_gradient_noise(model: torch.nn.Module, std: float, seed: int, step: int) -> int:
    """Add ``N(0, std^2)`` to every gradient of ``model`` in place; returns how many gradients got noise.

    Sharded gradients (DTensor, e.g. FSDP2): the full noise tensor is drawn on every rank (the same everywhere) and
    each rank keeps its own shard (``distribute_tensor(..., src_data_rank=None)`` splits locally, no communication).
    """
    count = 0
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        noise = _full_noise(grad, std, noise_seed(seed, step, name))
        placements = getattr(grad, "placements", None)
        if placements is not None:  # a DTensor gradient
            from torch.distributed.tensor import distribute_tensor

            noise = distribute_tensor(noise, grad.device_mesh, placements, src_data_rank=None)
        grad.add_(noise.to(grad.dtype))
        count += 1
    return count


# --- hooks ------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: GradNoiseConfig}


@hookimpl
def expertrain_after_backward(step: int, model: torch.nn.Module, config: Any) -> None:
    cfg: GradNoiseConfig = getattr(config, SECTION)
    std = sigma(step, cfg.eta, cfg.gamma)
    if std > 0:
        add_gradient_noise(model, std, cfg.seed, step)


@hookimpl
def expertrain_metrics(step: int, config: Any) -> dict[str, float]:
    cfg: GradNoiseConfig = getattr(config, SECTION)
    return {"gradnoise/sigma": sigma(step, cfg.eta, cfg.gamma)}


@hookimpl
def expertrain_state_dict(config: Any) -> dict[str, Any]:
    # The noise is a pure function of (seed, step, name): nothing to restore. The settings are saved so that a
    # resumed run can say when it no longer continues the same noise sequence.
    cfg: GradNoiseConfig = getattr(config, SECTION)
    return {"eta": cfg.eta, "gamma": cfg.gamma, "seed": cfg.seed}


@hookimpl
def expertrain_load_state_dict(state: dict[str, Any], config: Any) -> None:
    cfg: GradNoiseConfig = getattr(config, SECTION)
    changed = [
        f"{k}: {state[k]} -> {getattr(cfg, k)}"
        for k in ("eta", "gamma", "seed")
        if k in state and state[k] != getattr(cfg, k)
    ]
    if changed:
        log.warning(
            "gradnoise settings differ from the checkpoint (%s); the noise sequence changes",
            ", ".join(changed),
        )
