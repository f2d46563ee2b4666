"""Like-for-like reproductions of each plugin paper's claim, claim by claim, resumable: ``docs/results.md``.

Every claim compares the arms its paper compared, with the real trainer (``framework.train`` in a Python process, one
rank and one thread per run; ``--jobs`` runs train side by side, one per CPU core by default), the same data,
schedule, validation set (``data.val_seed``) and seeds:

- **pretraining claims** (``coe``, ``deepseek_moe``): each arm trained from scratch on the embedded corpus; the
  metric is the validation loss on the fixed validation set (lower is better);
- **fine-tuning claims** (``lora_vs_full``, ``hft``, ``corda``, ``lift``, ``soka``, ``compacter``, ``mola``): each arm
  fine-tunes one base (trained once per scale with a fixed recipe and cached, not committed: pretrained on the
  corpus, then warmed up on chat tasks that share the template and symbols but none of the skills, so that the base
  knows the format as a real base model does) on the generated SFT task (``framework/data/sft_tasks.py``). The
  learning rate is chosen on the task's validation rows (task validation loss); the reported score is exact
  match on separate **test** rows (never seen by the lr choice), forgetting is the loss on the base's previous
  skills (the warm-up tasks' validation rows) after minus before the fine-tune (the corpus loss does not survive the
  warm-up of a model this small; it is kept in the results as ``corpus_forgetting``), and "early loss" is the mean training loss over the first quarter of the steps (how fast an arm learns).

Per arm: an lr sweep (3 values at ``--scale cpu``, 5 at ``gpu``, 2 in ``--quick``) on seed 0, grown one value at a
time toward its edge while the best lr sits there (up to 5 values: :func:`next_lr`), then the other seeds at the
sweep's two best lrs, and the arm's lr is the one of the lower mean validation loss over seeds
(:func:`choose_lr_over_seeds`); mean ± sample standard deviation over seeds at that lr. Adapter arms run in both head protocols: the head frozen
(the default) and, where the plugin has the key, ``<plugin>.modules_to_save=[lm_head]`` (the arm name ends in
``+head``). Verdicts: the 95% confidence interval of the difference between the arms (Student's t, paired by seed)
against the claim's direction (see :func:`verdict`).

Results are cached per claim, arm and seed in ``benchmarks/results/reproduce/<claim>/<arm>-seed<k>.json`` (one entry
per learning rate); a rerun skips what is there, so a claim can be run in parts. Identical jobs shared by several
claims (full fine-tuning, LoRA) run once (``<cache>/runs``). ``--report`` rewrites ``docs/results.md`` and the plots
from whatever is cached.

    python benchmarks/reproduce.py --claim coe                 # one claim at the CPU scale (minutes: docs/results.md)
    python benchmarks/reproduce.py --claim all --scale gpu     # larger settings, unchanged on a CUDA machine
                                                               # (valid jobs in the tests; not yet run on a GPU)
    python benchmarks/reproduce.py --quick                      # every claim on a minuscule setting (a smoke test)
    python benchmarks/reproduce.py --report                     # docs/results.md from the cached results
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from framework.hooks import hookimpl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "reproduce"
DOCS_RESULTS = REPO / "docs" / "results.md"
DEFAULT_CACHE = Path(
    os.environ.get("EXPERTRAIN_REPRODUCE_CACHE", "~/.cache/expertrain/reproduce")
).expanduser()

Kind = Literal["pretrain", "sft"]
Expect = Literal["less", "greater", "approx"]


# --- scales --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Model and schedule sizes of one setting; every claim derives its shapes from these."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    batch: int
    micro_batch: int
    pretrain_steps: int  # the pretraining claims' arms
    base_steps: int  # the cached fine-tuning bases: pretraining on the corpus
    chat_steps: (
        int  # then a chat warm-up on tasks disjoint from the fine-tuning task (sft_tasks.WARMUP_TASKS)
    )
    sft_steps: int
    eval_batches: int
    train_rows: int
    val_rows: int  # lr choice (task validation loss)
    test_rows: int  # exact match
    n_lrs: int  # the first sweep of every arm
    seeds: int
    max_lrs: int = 5  # the sweep grows toward its edge while the best lr sits there, up to this many values


SCALES: dict[str, Scale] = {
    "quick": Scale("quick", 32, 2, 2, 1, 32, 4, 4, 2, 2, 2, 2, 1, 48, 4, 1, 2, 1, max_lrs=2),
    "cpu": Scale("cpu", 64, 4, 4, 2, 64, 16, 16, 200, 600, 300, 400, 8, 3000, 128, 400, 3, 3),
    "gpu": Scale("gpu", 512, 8, 8, 4, 512, 32, 16, 3000, 6000, 1000, 1000, 32, 20000, 256, 300, 5, 3),
}


# --- claims --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One configuration of a claim: job overrides (dotted keys) and its lr grid, as multiples of the claim's lr."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 0.25, 4.0)
    plugin: str = ""  # an adapter plugin: also run with <plugin>.modules_to_save=[lm_head] where supported


@dataclass(frozen=True)
class Comparison:
    """``a`` vs ``b`` on ``metric``: the paper expects ``a`` less than / greater than / about ``b``."""

    a: str
    b: str
    metric: str
    expect: Expect
    tolerance: float = 0.0  # for "approx": the largest difference that counts as equal
    claim: str = ""
    unlike: str = ""  # why the two arms do not train the same parts: then the difference is shown, not judged


@dataclass(frozen=True)
class Claim:
    """One paper's claim: how each arm is trained and which comparisons decide the verdict."""

    name: str
    paper: str
    statement: str
    kind: Kind
    lr: float  # the claim's reference lr; arms sweep multiples of it
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    base: str = "moe"  # fine-tuning claims: which cached base ("moe" or "dense8")
    model: Callable[[Scale], dict[str, Any]] | None = None  # pretraining claims: model + moe sections
    # More seeds than the scale's (not in --quick): where one unstable seed would decide a verdict.
    seeds: int = 0

    def seeds_at(self, scale: Scale) -> int:
        """The seeds each arm runs (at each of its finalist lrs) at ``scale``."""
        return scale.seeds if scale.name == "quick" else max(scale.seeds, self.seeds)


FULL_LRS = (0.3, 1.0, 3.0, 0.1, 10.0)
ADAPTER_LRS = (10.0, 5.0, 20.0, 2.5, 40.0)  # LoRA-type: ~5-20x the full fine-tuning lr
PISSA_LRS = (1.0, 3.0, 10.0, 0.3, 30.0)  # adapters initialised from the base's own components (CorDA, SoKA)
MOLA_LRS = (5.0, 2.5, 10.0, 1.25, 20.0)  # ADAPTER_LRS one step lower: 20x was the worst lr of every MoLA arm
ALL_LINEAR = "all-linear"


def _coe_model(s: Scale) -> dict[str, Any]:
    """Fine-grained experts (32 of hidden dim/2), top-4 in total: MoE picks 4 once, CoE 2 in each of 2 passes."""
    return {"moe.num_experts": 32, "moe.top_k": 4, "moe.expert_hidden": s.dim // 2}


def _deepseek_model(s: Scale) -> dict[str, Any]:
    """GShard-style baseline: 8 experts of hidden 2·dim, top-2; DeepSeekMoE arms cut them in 4 (same parameters)."""
    return {"moe.num_experts": 8, "moe.top_k": 2, "moe.expert_hidden": 2 * s.dim}


def _lora(r: int = 8) -> dict[str, Any]:
    return {
        "plugins": ["lora"],
        "lora.targets": ALL_LINEAR,
        "lora.target_experts": True,
        "lora.r": r,
        "lora.alpha": 2 * r,
        "lora.dropout": 0.0,
    }


def _lift(filter_rank: int, r: int = 8) -> dict[str, Any]:
    return {
        "plugins": ["lift"],
        "lift.targets": ALL_LINEAR,
        "lift.target_experts": True,
        "lift.r": r,
        "lift.filter_rank": filter_rank,
        "lift.update_interval": 100,
    }


def _corda(mode: str) -> dict[str, Any]:
    return {
        "plugins": ["corda"],
        "corda.targets": ALL_LINEAR,
        "corda.target_experts": True,
        "corda.r": 8,
        "corda.alpha": 8,
        "corda.mode": mode,
        "corda.calibration_samples": 16,
    }


def _mola(**section: Any) -> dict[str, Any]:
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "plugins": ["mola"],
        "mola.targets": projections,
        "mola.dropout": 0.0,
        **{f"mola.{k}": v for k, v in section.items()},
    }


_COE = {
    "plugins": ["chain_of_experts"],
    "moe.block": "chain_of_experts",
    "moe.route_norm": False,  # in every arm of the claim: one expert's renormalised gate would be a constant 1
    "chain_of_experts.iterations": 2,
}
_DEEPSEEK = {
    "plugins": ["deepseek_moe"],
    "moe.block": "deepseek_moe",
    "moe.route_norm": False,
    "deepseek_moe.isolate_shared": True,
}

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "coe",
        "Chain-of-Experts (arXiv 2506.18945)",
        "CoE with 2 iterations of top-K/2 reaches a lower validation loss than a top-K MoE at equal compute (fine-"
        "grained experts); the outer-residual ablation loses the gain",
        "pretrain",
        2e-3,
        (
            Arm("moe_top4", {"moe.route_norm": False}, (1.0, 2.0, 0.5, 4.0, 0.25)),
            Arm("coe_2x2", {**_COE, "chain_of_experts.residual": "inner"}, (1.0, 2.0, 0.5, 4.0, 0.25)),
            Arm(
                "moe_top4_no_h",
                {**_COE, "chain_of_experts.iterations": 1, "chain_of_experts.residual": "inner_no_h"},
                (1.0, 2.0, 0.5, 4.0, 0.25),
            ),
            Arm(
                "coe_2x2_no_h",
                {**_COE, "chain_of_experts.residual": "inner_no_h"},
                (1.0, 2.0, 0.5, 4.0, 0.25),
            ),
            Arm("coe_2x2_outer", {**_COE, "chain_of_experts.residual": "outer"}, (1.0, 2.0, 0.5, 4.0, 0.25)),
        ),
        (
            Comparison("coe_2x2", "moe_top4", "val_loss", "less", claim="CoE-2 < MoE (block adds h)"),
            Comparison(
                "coe_2x2_no_h", "moe_top4_no_h", "val_loss", "less", claim="CoE-2 < MoE (reference form)"
            ),
            Comparison("coe_2x2", "coe_2x2_outer", "val_loss", "less", claim="inner < outer residual"),
        ),
        model=_coe_model,
    ),
    Claim(
        "deepseek_moe",
        "DeepSeekMoE (arXiv 2401.06066)",
        "fine-grained segmentation + shared-expert isolation beats a GShard-style top-2 MoE at equal FLOPs and "
        "parameters; each of the two parts helps on its own",
        "pretrain",
        2e-3,
        (
            Arm("gshard_top2", {"moe.route_norm": False}, (1.0, 2.0, 0.5, 4.0, 0.25)),
            Arm(
                "deepseek_m4_s1",
                {**_DEEPSEEK, "deepseek_moe.segments": 4, "moe.shared_experts": 1},
                (1.0, 2.0, 0.5, 4.0, 0.25),
            ),
            Arm(
                "segments_only_m4",
                {**_DEEPSEEK, "deepseek_moe.segments": 4, "moe.shared_experts": 0},
                (1.0, 2.0, 0.5, 4.0, 0.25),
            ),
            Arm(
                "shared_only_s1",
                {**_DEEPSEEK, "deepseek_moe.segments": 1, "moe.shared_experts": 1},
                (1.0, 2.0, 0.5, 4.0, 0.25),
            ),
        ),
        (
            Comparison("deepseek_m4_s1", "gshard_top2", "val_loss", "less", claim="DeepSeekMoE < GShard"),
            Comparison("segments_only_m4", "gshard_top2", "val_loss", "less", claim="segments alone help"),
            Comparison(
                "shared_only_s1", "gshard_top2", "val_loss", "less", claim="shared isolation alone helps"
            ),
            Comparison(
                "deepseek_m4_s1", "segments_only_m4", "val_loss", "less", claim="both < segments only"
            ),
        ),
        model=_deepseek_model,
        seeds=5,  # the GShard baseline has an unstable seed at this size (one of five ends 0.4 nats worse)
    ),
    Claim(
        "lora_vs_full",
        "LoRA (Hu et al. 2021)",
        "LoRA on every linear layer matches full fine-tuning on the task",
        "sft",
        1e-3,
        (Arm("full", {}, FULL_LRS), Arm("lora_r8", _lora(), ADAPTER_LRS, plugin="lora")),
        (
            Comparison(
                "lora_r8",
                "full",
                "exact_match",
                "approx",
                0.05,
                "LoRA ≈ full FT (frozen head)",
                unlike="full FT trains the LM head, this arm keeps it frozen: the +head row is the like-for-like one",
            ),
            Comparison(
                "lora_r8",
                "full",
                "val_loss",
                "approx",
                0.1,
                "LoRA ≈ full FT, task loss (frozen head)",
                unlike="full FT trains the LM head, this arm keeps it frozen: the +head row is the like-for-like one",
            ),
            Comparison(
                "lora_r8+head", "full", "val_loss", "approx", 0.1, "LoRA ≈ full FT, task loss (trained head)"
            ),
            Comparison(
                "lora_r8+head", "full", "exact_match", "approx", 0.05, "LoRA ≈ full FT (trained head)"
            ),
        ),
    ),
    Claim(
        "hft",
        "Half Fine-Tuning (arXiv 2404.18466)",
        "HFT matches full fine-tuning on the task and forgets less of what the base knew before",
        "sft",
        1e-3,
        (
            Arm("full", {}, FULL_LRS),
            Arm(
                "hft",
                {"plugins": ["hft"], "hft.seed": 0, "hft.stage_every": 0, "hft.train_router": True},
                FULL_LRS,
            ),
        ),
        (
            Comparison("hft", "full", "exact_match", "approx", 0.05, "HFT ≈ full FT on the task"),
            Comparison("hft", "full", "val_loss", "approx", 0.1, "HFT ≈ full FT, task loss"),
            Comparison("hft", "full", "forgetting", "less", claim="HFT forgets less"),
        ),
    ),
    Claim(
        "corda",
        "CorDA (arXiv 2406.05223)",
        "knowledge-preserved CorDA forgets less than LoRA at a similar task score; instruction-previewed CorDA learns "
        "the task faster than LoRA",
        "sft",
        1e-3,
        (
            Arm("lora_r8", _lora(), ADAPTER_LRS, plugin="lora"),
            Arm("corda_kpm", _corda("kpm"), PISSA_LRS, plugin="corda"),
            Arm("corda_ipm", _corda("ipm"), PISSA_LRS, plugin="corda"),
        ),
        (
            Comparison("corda_kpm", "lora_r8", "forgetting", "less", claim="KPM forgets less than LoRA"),
            Comparison("corda_kpm", "lora_r8", "exact_match", "approx", 0.05, "KPM ≈ LoRA on the task"),
            Comparison("corda_kpm", "lora_r8", "val_loss", "approx", 0.1, "KPM ≈ LoRA, task loss"),
            Comparison("corda_ipm", "lora_r8", "early_loss", "less", claim="IPM learns faster than LoRA"),
        ),
    ),
    Claim(
        "lift",
        "LIFT (arXiv 2506.00772)",
        "LIFT's principal weights (low-rank filtered magnitude) beat magnitude-only sparse fine-tuning at the same "
        "budget, and beat LoRA with the same number of trained parameters",
        "sft",
        1e-3,
        (
            Arm("lift_r8", _lift(filter_rank=8), PISSA_LRS, plugin="lift"),
            Arm("magnitude_r8", _lift(filter_rank=0), PISSA_LRS, plugin="lift"),
            Arm("lora_r8", _lora(), ADAPTER_LRS, plugin="lora"),
        ),
        (
            Comparison("lift_r8", "magnitude_r8", "exact_match", "greater", claim="LIFT > magnitude-only"),
            Comparison("lift_r8", "lora_r8", "exact_match", "greater", claim="LIFT > LoRA (same budget)"),
            Comparison(
                "lift_r8", "magnitude_r8", "val_loss", "less", claim="LIFT < magnitude-only, task loss"
            ),
            Comparison("lift_r8", "lora_r8", "val_loss", "less", claim="LIFT < LoRA, task loss"),
            Comparison(
                "lift_r8+head",
                "magnitude_r8+head",
                "val_loss",
                "less",
                claim="LIFT < magnitude-only, task loss (head)",
            ),
            Comparison(
                "lift_r8+head", "lora_r8+head", "val_loss", "less", claim="LIFT < LoRA, task loss (head)"
            ),
            Comparison("lift_r8", "lora_r8", "forgetting", "less", claim="LIFT forgets less than LoRA"),
        ),
    ),
    Claim(
        "soka",
        "SoKA (arXiv 2506.15251)",
        "SoKA matches LoRA with fewer trained parameters (ranks chosen per layer by the energy/elbow rule)",
        "sft",
        1e-3,
        (
            Arm("lora_r8", _lora(), ADAPTER_LRS, plugin="lora"),
            Arm(
                "soka",
                {
                    "plugins": ["soka"],
                    "soka.targets": ALL_LINEAR,
                    "soka.target_experts": True,
                    # The cap is LoRA r8's budget (a Kronecker term of a d x d weight has 2d entries, like one
                    # LoRA rank); at tau 0.3 the energy/elbow rule binds below it (ranks 3-8, mean 6.4, on the
                    # cpu base), at 0.5 it barely does (mean 7.8) and with a cap of 16 it goes past LoRA's budget.
                    "soka.energy": 0.3,
                    "soka.use_elbow": True,
                    "soka.max_rank": 8,
                },
                PISSA_LRS,
                plugin="soka",
            ),
        ),
        (
            Comparison("soka", "lora_r8", "exact_match", "approx", 0.05, "SoKA ≈ LoRA on the task"),
            Comparison("soka", "lora_r8", "val_loss", "approx", 0.1, "SoKA ≈ LoRA, task loss"),
            Comparison("soka", "lora_r8", "trained_params", "less", claim="SoKA trains fewer parameters"),
        ),
    ),
    Claim(
        "compacter",
        "Compacter (arXiv 2106.04647)",
        "Compacter comes near full fine-tuning with a tiny share of trained parameters",
        "sft",
        1e-3,
        (
            Arm("full", {}, FULL_LRS),
            Arm(
                "compacter",
                {
                    "plugins": ["compacter"],
                    "compacter.variant": "compacter",
                    "compacter.n": 4,
                    "compacter.reduction_factor": 8,
                    "compacter.train_norms": True,
                    "compacter.seed": 0,
                },
                (3.0, 10.0, 30.0, 1.0, 100.0),
                plugin="compacter",
            ),
        ),
        (
            Comparison(
                "compacter",
                "full",
                "exact_match",
                "approx",
                0.05,
                "Compacter ≈ full FT (frozen head)",
                unlike="full FT trains the LM head, this arm keeps it frozen: the +head row is the like-for-like one",
            ),
            Comparison(
                "compacter+head", "full", "exact_match", "approx", 0.05, "Compacter ≈ full FT (trained head)"
            ),
            Comparison(
                "compacter",
                "full",
                "val_loss",
                "approx",
                0.1,
                "Compacter ≈ full FT, task loss (frozen head)",
                unlike="full FT trains the LM head, this arm keeps it frozen: the +head row is the like-for-like one",
            ),
            Comparison(
                "compacter+head",
                "full",
                "val_loss",
                "approx",
                0.1,
                "Compacter ≈ full FT, task loss (trained head)",
            ),
        ),
    ),
    Claim(
        "mola",
        "MoLA (arXiv 2402.08562)",
        "inverted-triangle allocation (2-4-6-8) beats the uniform allocation with the same total experts (5-5-5-5) "
        "and matches or beats 8-8-8-8 with fewer parameters (dense base, >= 8 layers, all 7 projections)",
        "sft",
        1e-3,
        (
            Arm("mola_2468", _mola(allocation="inverted_triangle", base_experts=8), MOLA_LRS, plugin="mola"),
            Arm("mola_5555", _mola(base_experts=5, allocation="uniform"), MOLA_LRS, plugin="mola"),
            Arm("mola_8888", _mola(base_experts=8, allocation="uniform"), MOLA_LRS, plugin="mola"),
        ),
        (
            Comparison(
                "mola_2468", "mola_5555", "exact_match", "greater", claim="2-4-6-8 > 5-5-5-5 (equal total)"
            ),
            Comparison("mola_2468", "mola_8888", "exact_match", "approx", 0.05, "2-4-6-8 ≈ 8-8-8-8"),
            Comparison("mola_2468", "mola_5555", "val_loss", "less", claim="2-4-6-8 < 5-5-5-5, task loss"),
            Comparison("mola_2468", "mola_8888", "val_loss", "approx", 0.1, "2-4-6-8 ≈ 8-8-8-8, task loss"),
            Comparison(
                "mola_2468+head", "mola_5555+head", "exact_match", "greater", claim="2-4-6-8 > 5-5-5-5 (head)"
            ),
            Comparison(
                "mola_2468+head",
                "mola_5555+head",
                "val_loss",
                "less",
                claim="2-4-6-8 < 5-5-5-5, task loss (head)",
            ),
            Comparison(
                "mola_2468+head", "mola_8888+head", "exact_match", "approx", 0.05, "2-4-6-8 ≈ 8-8-8-8 (head)"
            ),
            Comparison(
                "mola_2468+head",
                "mola_8888+head",
                "val_loss",
                "approx",
                0.1,
                "2-4-6-8 ≈ 8-8-8-8, task loss (head)",
            ),
        ),
        base="dense8",
    ),
)
CLAIMS_BY_NAME = {c.name: c for c in CLAIMS}


# --- jobs ----------------------------------------------------------------------------------------------------------


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (a top-level key stays as it is)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, leaf = key.partition(".")
        if leaf:
            out.setdefault(section, {})[leaf] = value
        else:
            out[section] = value
    return out


def _merge(job: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    for key, value in _nest(flat).items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def model_sections(s: Scale, n_layers: int | None = None, dense: bool = False) -> dict[str, Any]:
    """The model and moe sections of a scale (the PEFT base is the quickstart's shape: 8 experts, top-2)."""
    return {
        "model": {
            "vocab_size": 8192,
            "dim": s.dim,
            "n_layers": n_layers or s.n_layers,
            "n_heads": s.n_heads,
            "n_kv_heads": s.n_kv_heads,
            "ffn_hidden": 4 * s.dim if dense else (8 * s.dim) // 3,
            "max_seq_len": s.seq_len,
        },
        "moe": {"num_experts": 0}
        if dense
        else {"num_experts": 8, "top_k": 2, "expert_hidden": s.dim, "experts_impl": "grouped_mm"},
    }


def common_sections(s: Scale, steps: int, lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return {
        "parallel": {"data": "ddp"},
        "data": {"seq_len": s.seq_len, "val_seed": 1234},
        "optim": {
            "lr": lr,
            "warmup_steps": max(1, min(20, steps // 10)),
            "weight_decay": 0.0,
            "grad_clip": 1.0,
        },
        "train": {
            "steps": steps,
            "seed": seed,
            "global_batch_size": s.batch,
            "micro_batch_size": s.micro_batch,
            "eval_every": steps,
            "eval_batches": s.eval_batches,
            "sample_tokens": 0,
            **({"device": "cpu"} if s.name == "quick" else {}),  # the smoke test runs the same everywhere
        },
        "checkpoint": {"every": 0, "keep_last": 1, "save_final": True},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False, "plots": False},
        "run": {"dir": str(run_dir)},
    }


BASE_RECIPES = {
    "moe": "the quickstart's shape at this scale (8 experts of hidden dim, top-2), embedded corpus",
    "dense8": "a dense llama-like model with 8 layers (MLP hidden 4·dim), embedded corpus",
}


def base_job(name: str, s: Scale, run_dir: Path) -> dict[str, Any]:
    """The fixed pretraining recipe of a fine-tuning base (lr 2e-3, weight decay 0.1, cosine)."""
    dense = name == "dense8"
    # MoLA's claim needs >= 8 layers; the quick setting is a smoke test of the pipeline, 4 are enough there.
    layers = (4 if s.name == "quick" else max(8, s.n_layers)) if dense else None
    job = {"plugins": [], **model_sections(s, n_layers=layers, dense=dense)}
    job.update(common_sections(s, s.base_steps, 2e-3, 0, run_dir))
    job["optim"]["weight_decay"] = 0.1
    job["checkpoint"]["save_final"] = True
    return job


def chat_job(name: str, pretrained: Path, s: Scale, run_dir: Path, warmup_task: Path) -> dict[str, Any]:
    """The fine-tuning base's second stage: full fine-tuning of the pretrained base on the warm-up chat tasks (copy,
    first, last, count; none of the fine-tuning task's skills), so that the base knows the chat template and the
    symbols, as a real base model does, and an adapter with a frozen head starts from usable output rows."""
    shape = base_job(name, s, run_dir)
    job = {"plugins": [], "model": {**shape["model"], "init_from": str(pretrained)}, "moe": shape["moe"]}
    job.update(common_sections(s, s.chat_steps, 2e-3, 0, run_dir))
    job["sft"] = {
        "train_files": [str(warmup_task / "train.jsonl")],
        "val_file": str(warmup_task / "val.jsonl"),
        "packing": True,
    }
    job["checkpoint"]["save_final"] = True
    return job


def arm_job(claim: Claim, arm: Arm, head: bool, s: Scale, lr: float, seed: int, run_dir: Path,
            base: Path | None, task: Path | None) -> dict[str, Any]:  # fmt: skip
    """The job of one arm at one lr and seed."""
    job: dict[str, Any] = {"plugins": []}
    if claim.kind == "pretrain":
        job.update(model_sections(s))
        job["moe"] = {**job["moe"], "aux_loss_coef": 0.01, "z_loss_coef": 0.001}
        _merge(job, claim.model(s) if claim.model else {})
        job.update(common_sections(s, s.pretrain_steps, lr, seed, run_dir))
        job["optim"]["weight_decay"] = 0.1
        job["checkpoint"]["save_final"] = False
    else:
        assert base is not None and task is not None
        shape = base_job(claim.base, s, run_dir)
        job["model"] = {**shape["model"], "init_from": str(base)}
        job["moe"] = shape["moe"]
        job.update(common_sections(s, s.sft_steps, lr, seed, run_dir))
        job["checkpoint"]["save_final"] = False  # scored on the trained model in process (train_job's at_end)
        job["sft"] = {
            "train_files": [str(task / "train.jsonl")],
            "val_file": str(task / "val.jsonl"),
            "packing": True,
        }
        if seed:  # a fine-tune starts from the base's weights: its seed is the order of the rows (sft.seed, default 0)
            job["sft"]["seed"] = seed
    _merge(job, arm.overrides)
    if head:
        job[arm.plugin] = {**job.get(arm.plugin, {}), "modules_to_save": ["lm_head"]}
    return job


@functools.cache
def supports_modules_to_save(plugin: str) -> bool:
    """Whether the plugin's config section has ``modules_to_save`` (the trained-head protocol)."""
    import dataclasses

    from framework.hooks import PluginManager
    from framework.models import default_registry

    pm = PluginManager(default_registry())
    pm.load([plugin])
    section = pm.config_sections.get(plugin)
    return section is not None and any(f.name == "modules_to_save" for f in dataclasses.fields(section))


def arm_variants(claim: Claim) -> list[tuple[str, Arm, bool]]:
    """(name, arm, trained head) for every arm of the claim: adapters in both head protocols where supported."""
    out = []
    for arm in claim.arms:
        out.append((arm.name, arm, False))
        if arm.plugin and supports_modules_to_save(arm.plugin):
            out.append((f"{arm.name}+head", arm, True))
    return out


# --- running -------------------------------------------------------------------------------------------------------


def job_key(job: dict[str, Any]) -> str:
    """A hash of the job without its run folder: equal jobs (an arm shared by two claims) share one result."""
    body = {k: v for k, v in job.items() if k != "run"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def captured(log: Path) -> Iterator[io.StringIO]:
    """The trainer's console output into ``log`` (and a buffer), not the terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            yield buffer
        finally:
            log.write_text(buffer.getvalue(), encoding="utf-8")


def train_job(
    job: dict[str, Any], run_dir: Path, at_end: Callable[[Any, Path], dict[str, Any]] | None = None
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """Run the real trainer on ``job`` in this process, as ``framework.train`` does on one rank (job checks, plugins,
    the ``Trainer``); (summary, console text, metrics records). ``at_end(model, run_dir)``: scores added to the
    summary at the end of training, on the trained model itself (an in-process plugin's ``expertrain_train_end``),
    so no checkpoint has to be written and read back for them."""
    import torch

    from framework.observe import console
    from framework.parallel.setup import init_distributed
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job_file = run_dir.parent / f"{run_dir.name}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    log = run_dir.parent / f"{run_dir.name}.log"
    console.quiet_dependencies()
    with captured(log) as out:
        try:
            config, pm = load_job(str(job_file), [], world=1)
            if at_end is not None:
                pm.register_object("reproduce_scores", _ScoresAtEnd(at_end, run_dir))
            info = init_distributed(
                config.train.device, config.parallel.timeout_s, config.train.deterministic
            )
            torch.manual_seed(config.train.seed + info.rank)
            trainer = Trainer(config, pm, info)
            try:
                trainer.build()
                summary = trainer.run()
            finally:
                trainer.close()
        except Exception as exc:
            raise RuntimeError(f"{run_dir.name} failed: {exc}\n{out.getvalue()[-2000:]}") from exc
    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x
    ]
    return summary, out.getvalue(), records


class _ScoresAtEnd:
    """In-process plugin: adds ``score(model, run_dir)`` to the run's summary when training ends."""

    def __init__(self, score: Callable[[Any, Path], dict[str, Any]], run_dir: Path) -> None:
        self.score, self.run_dir = score, run_dir

    @hookimpl
    def expertrain_train_end(self, model: Any, summary: dict[str, Any], config: Any) -> None:
        summary.update(self.score(model, self.run_dir))


EVALUATION = 3
"""Version of the fine-tuning scores (:class:`Evaluator`): a run scored by another version is rerun, not reported.
1: forgetting on the corpus; 2: forgetting on the base's previous skills (the warm-up tasks), corpus loss kept;
3: test prompts of equal length answered together (:data:`EVAL_BATCH` at a time) instead of one by one."""

EVAL_BATCH = 64
"""Test prompts answered together by :class:`Evaluator` (greedy, equal lengths, no padding)."""


def sft_loss(model: Any, batches: list[tuple[Any, Any, Any]]) -> float:
    """Mean next-token loss (nats) of ``model`` over packed SFT batches ``(input_ids, labels, position_ids)``."""
    import torch

    from framework.train.loss import count_loss_tokens, lm_loss_sum

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels, position_ids in batches:
            logits = model(input_ids.to(device), position_ids.to(device))
            total += float(lm_loss_sum(logits, labels.to(device)))
            count += count_loss_tokens(labels)
    model.discard_routing_state()
    return total / max(count, 1)


class Evaluator:
    """The scores of a fine-tuned model: exact match on the task's test rows; forgetting, the loss on the validation
    rows of the base's previous skills (its warm-up tasks) after minus before the fine-tune; and the same on the
    corpus validation batches of the base's first stage (``corpus_forgetting``)."""

    def __init__(self, base: Path, pretrained: Path, task: Path, warmup: Path, seq_len: int,
                 max_new_tokens: int) -> None:  # fmt: skip
        import torch

        from framework.checkpoint.export import load_model
        from framework.config.sections import SFTDataConfig
        from framework.data.sft import build_sft_datasets, collate_sft

        sys.path.insert(0, str(REPO / "benchmarks"))
        from peft_methods import PretrainingValidation, base_config

        self.validation = PretrainingValidation(base_config(str(pretrained)))
        rows = SFTDataConfig(train_files=[str(warmup / "val.jsonl")], val_file=str(warmup / "val.jsonl"))
        _, skills = build_sft_datasets(rows, base / "tokenizer", seq_len)
        assert skills is not None
        items = [skills[i] for i in range(len(skills))]
        self.skill_batches = [collate_sft(items[i : i + 16]) for i in range(0, len(items), 16)]
        start = load_model(base)[0].eval()  # the model every fine-tune starts from
        with torch.no_grad():
            self.corpus_before = self.corpus_loss(start)
            self.before = sft_loss(start, self.skill_batches)
        self.test_rows = [
            json.loads(x) for x in (task / "test.jsonl").read_text(encoding="utf-8").splitlines() if x
        ]
        self.max_new_tokens = max_new_tokens

    def corpus_loss(self, model: Any) -> float:
        """Mean next-token loss of ``model`` on the first stage's corpus validation batches (call under no_grad)."""
        from framework.train.loss import count_loss_tokens, lm_loss_sum

        device = next(model.parameters()).device
        total, count = 0.0, 0
        for input_ids, labels in self.validation.batches:
            total += float(lm_loss_sum(model(input_ids.to(device)), labels.to(device)))
            count += count_loss_tokens(labels)
        model.discard_routing_state()
        return total / max(count, 1)

    def __call__(self, model: Any, run_dir: Path) -> dict[str, float]:
        """Scores of the trained ``model`` (whole, on this process: one rank, no sharding)."""
        import torch

        from framework.data.sft import ChatTokenizer
        from framework.inference.generate import exact_match_accuracy

        model.eval()
        with torch.no_grad():
            corpus_after = self.corpus_loss(model)
            skills_after = sft_loss(model, self.skill_batches)
            chat = ChatTokenizer.from_dir(run_dir / "tokenizer")
            accuracy, _ = exact_match_accuracy(
                model, chat, self.test_rows, self.max_new_tokens, batch_size=EVAL_BATCH
            )
        return {
            "exact_match": accuracy,
            "skills_loss_after": skills_after,
            "forgetting": skills_after - self.before,
            "pretrain_loss_after": corpus_after,
            "corpus_forgetting": corpus_after - self.corpus_before,
        }


def run_metrics(summary: dict[str, Any], text: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What every run reports, from the trainer's summary, console and metrics."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peft_methods import trained_parameters

    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    quarter = max(1, len(losses) // 4)
    trained, total, exact = trained_parameters(text, summary["params_total"])
    return {
        "val_loss": summary["val_loss"],
        "early_loss": statistics.fmean(v for _, v in losses[:quarter]) if losses else None,
        "final_train_loss": losses[-1][1] if losses else None,
        "tokens_seen": summary["tokens_seen"],
        "params_total": summary["params_total"],
        "params_active": summary["params_active"],
        "trained_params": int(trained),
        "trained_params_exact": exact,
        "trained_pct": 100 * trained / max(total, 1),
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "curve": losses[:: max(1, len(losses) // 60)],
    }


@dataclass
class Suite:
    """One scale's runs: bases, task data, the shared run memo and the per-claim result files."""

    scale: Scale
    cache: Path
    results: Path
    log: Callable[[str], None] = print
    _evaluators: dict[str, Evaluator] = field(default_factory=dict)

    # -- shared inputs
    def pretrained_dir(self, name: str) -> Path:
        """Where the base's first stage is cached (a hash of its recipe: a changed recipe is a new folder)."""
        return (
            self.cache
            / "bases"
            / f"{name}-{self.scale.name}-{job_key(base_job(name, self.scale, Path('x')))}"
        )

    def base_dir(self, name: str) -> Path:
        """Where the fine-tuning base (after its chat warm-up) is cached."""
        probe = chat_job(name, self.pretrained_dir(name), self.scale, Path("x"), self.warmup_task())
        return self.cache / "bases" / f"{name}-chat-{self.scale.name}-{job_key(self.portable(probe))}"

    def pretrained(self, name: str) -> Path:
        """The base's first stage: pretrained on the embedded corpus with the fixed recipe (trained once)."""
        run_dir = self.pretrained_dir(name)
        if not (run_dir / "summary.json").is_file():
            self.log(f"base {name}: pretraining {self.scale.base_steps} steps ({BASE_RECIPES[name]})")
            start = time.perf_counter()
            train_job(base_job(name, self.scale, run_dir), run_dir)
            self.log(f"base {name}: done in {time.perf_counter() - start:.0f} s")
        return run_dir

    def base(self, name: str) -> Path:
        """The fine-tuning base: the pretrained base after its chat warm-up (:func:`chat_job`; trained once)."""
        pretrained, run_dir = self.pretrained(name), self.base_dir(name)
        if not (run_dir / "summary.json").is_file():
            self.log(f"base {name}: chat warm-up, {self.scale.chat_steps} steps")
            start = time.perf_counter()
            train_job(chat_job(name, pretrained, self.scale, run_dir, self.warmup_task()), run_dir)
            self.log(f"base {name}: chat warm-up done in {time.perf_counter() - start:.0f} s")
        return run_dir

    def base_info(self, name: str) -> dict[str, Any]:
        summary = json.loads((self.pretrained(name) / "summary.json").read_text(encoding="utf-8"))
        chat = json.loads((self.base(name) / "summary.json").read_text(encoding="utf-8"))
        return {
            "name": name,
            "recipe": BASE_RECIPES[name],
            "steps": summary["steps"],
            "tokens_seen": summary["tokens_seen"],
            "val_loss": summary["val_loss"],
            "unigram_entropy": summary.get("unigram_entropy"),
            "params_total": summary["params_total"],
            "chat_steps": chat["steps"],
            "chat_tokens_seen": chat["tokens_seen"],
            "chat_val_loss": chat["val_loss"],
            "corpus_loss_start": self.evaluator(name).corpus_before,
            "skills_loss_start": self.evaluator(name).before,
        }

    def warmup_task(self) -> Path:
        """The chat warm-up rows of the base's second stage (:data:`framework.data.sft_tasks.WARMUP_TASKS`)."""
        from framework.data.sft_tasks import WARMUP_TASKS, write_task

        folder = self.cache / f"warmup_task-{self.scale.train_rows}"
        if not (folder / "val.jsonl").is_file():
            write_task(folder, self.scale.train_rows, 64, seed=1, tasks=WARMUP_TASKS)
        return folder

    def task(self) -> Path:
        """The SFT task: train rows, validation rows (lr choice) and test rows (exact match), disjoint prompts."""
        from framework.data.sft_tasks import write_task

        s = self.scale
        folder = self.cache / f"sft_task-{s.train_rows}-{s.val_rows}-{s.test_rows}"
        if not (folder / "test.jsonl").is_file():
            write_task(folder, s.train_rows, s.val_rows + s.test_rows, seed=0)
            rows = (folder / "val.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            (folder / "val.jsonl").write_text("".join(rows[: s.val_rows]), encoding="utf-8")
            (folder / "test.jsonl").write_text("".join(rows[s.val_rows :]), encoding="utf-8")
        return folder

    def evaluator(self, base_name: str) -> Evaluator:
        if base_name not in self._evaluators:
            with captured(self.cache / "evaluator.log"):
                # The task's answers are at most 12 tokens and their end marker; quick only checks the path.
                max_new_tokens = 2 if self.scale.name == "quick" else 16
                self._evaluators[base_name] = Evaluator(
                    self.base(base_name),
                    self.pretrained(base_name),
                    self.task(),
                    self.warmup_task(),
                    self.scale.seq_len,
                    max_new_tokens,
                )
        return self._evaluators[base_name]

    # -- one run
    def portable(self, job: dict[str, Any]) -> dict[str, Any]:
        """``job`` with this machine's cache folder written as ``<cache>`` (results and keys are machine-free)."""
        return json.loads(json.dumps(job).replace(str(self.cache), "<cache>"))

    def key(self, claim: Claim, arm: Arm, head: bool, lr: float, seed: int) -> str:
        """The hash of the job of one run (a result stored under another hash is stale: its job changed)."""
        base = self.base_dir(claim.base) if claim.kind == "sft" else None
        task = self.task() if claim.kind == "sft" else None
        return job_key(self.portable(arm_job(claim, arm, head, self.scale, lr, seed, Path("x"), base, task)))

    def memo(self, claim: Claim, arm: Arm, head: bool, lr: float, seed: int) -> Path:
        """Where the result of one run is kept for every claim that has the same job (the run memo)."""
        key = self.key(claim, arm, head, lr, seed)
        return self.cache / "runs" / (f"{key}-e{EVALUATION}.json" if claim.kind == "sft" else f"{key}.json")

    def run(self, claim: Claim, arm: Arm, head: bool, lr: float, seed: int) -> dict[str, Any]:
        base = self.base(claim.base) if claim.kind == "sft" else None
        task = self.task() if claim.kind == "sft" else None
        key = self.key(claim, arm, head, lr, seed)
        if (memo := self.memo(claim, arm, head, lr, seed)).is_file():
            return json.loads(memo.read_text(encoding="utf-8"))
        run_dir = self.cache / "work" / key
        job = arm_job(claim, arm, head, self.scale, lr, seed, run_dir, base, task)
        at_end = self.evaluator(claim.base) if claim.kind == "sft" else None
        start = time.perf_counter()
        summary, text, records = train_job(job, run_dir, at_end)
        result = {"lr": lr, "seed": seed, **run_metrics(summary, text, records)}
        result["wall_seconds"] = round(time.perf_counter() - start, 1)  # training and scoring, one thread
        for name in (
            "exact_match",
            "skills_loss_after",
            "forgetting",
            "pretrain_loss_after",
            "corpus_forgetting",
        ):
            if name in summary:
                result[name] = summary[name]
        if claim.kind == "sft":
            result["evaluation"] = EVALUATION
        result["job"] = self.portable({k: v for k, v in job.items() if k != "run"})
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(result, indent=1), encoding="utf-8")
        shutil.rmtree(run_dir, ignore_errors=True)
        return result

    # -- one claim
    def arm_file(self, claim: Claim, arm_name: str, seed: int) -> Path:
        return self.results / claim.name / f"{arm_name}-seed{seed}.json"

    def load_arm(self, claim: Claim, arm_name: str, seed: int) -> dict[str, dict[str, Any]]:
        """The cached runs of one arm and seed, by lr; runs whose job is no longer the arm's (a changed recipe,
        base or grid) are left out, so a report never mixes them with current ones."""
        path = self.arm_file(claim, arm_name, seed)
        if not path.is_file():
            return {}
        arm, head = next((a, h) for n, a, h in arm_variants(claim) if n == arm_name)
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        scored = EVALUATION if claim.kind == "sft" else None
        return {
            lr: r
            for lr, r in runs.items()
            if job_key(self.portable(r["job"])) == self.key(claim, arm, head, float(lr), seed)
            and r.get("evaluation") == scored
        }

    def save_arm(self, claim: Claim, arm_name: str, seed: int, runs: dict[str, dict[str, Any]]) -> None:
        path = self.arm_file(claim, arm_name, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        runs = {lr: {**r, "job": self.portable(r["job"])} for lr, r in runs.items()}
        body = {"claim": claim.name, "arm": arm_name, "seed": seed, "scale": self.scale.name, "runs": runs}
        path.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")

    def run_claim(
        self,
        claim: Claim,
        seeds: int,
        arms: list[str] | None = None,
        n_lrs: int = 0,
        pool: RunPool | None = None,
    ) -> dict[str, Any]:
        """Every arm's lr sweep (seed 0) and the other seeds at its finalist lrs; cached per arm and seed. ``arms``: only
        these (a session can run part of a claim); ``n_lrs``: sweep this many lrs instead of the scale's; ``pool``:
        where the runs train (independent runs in parallel; default: one after another in this process)."""
        n_lrs = n_lrs or self.scale.n_lrs
        max_lrs = max(n_lrs, self.scale.max_lrs)
        plans = [
            ArmPlan(n, a, h, [claim.lr * f for f in a.lr_factors], n_lrs, max_lrs, seeds)
            for n, a, h in arm_variants(claim)
            if not arms or n in arms
        ]
        for plan in plans:
            plan.runs = {seed: self.load_arm(claim, plan.name, seed) for seed in range(seeds)}
        pool = pool or RunPool(self, 1)
        if claim.kind == "sft":  # trained here, once, before any run needs them
            self.base(claim.base), self.task()
        planned = sum(plan.planned() for plan in plans)
        done = sum(plan.finished() for plan in plans)
        started, ran, in_flight = time.perf_counter(), 0, {}
        failed: BaseException | None = None
        while True:
            finished: list[tuple[ArmPlan, float, int, dict[str, Any], bool]] = []
            for plan in plans if failed is None else []:
                for lr, seed in plan.ready():
                    if (plan.name, lr, seed) in in_flight.values():
                        continue
                    if (memo := self.memo(claim, plan.arm, plan.head, lr, seed)).is_file():
                        finished.append((plan, lr, seed, json.loads(memo.read_text(encoding="utf-8")), True))
                    elif len(in_flight) < pool.jobs:
                        in_flight[pool.submit(claim, plan.name, lr, seed)] = (plan.name, lr, seed)
            if not in_flight and not finished:
                break
            for future in pool.wait(list(in_flight)) if not finished else []:
                name, lr, seed = in_flight.pop(future)
                if (error := future.exception()) is not None:
                    failed = failed or error  # the runs still training finish and are kept, then it is raised
                    continue
                finished.append((next(p for p in plans if p.name == name), lr, seed, future.result(), False))
            for plan, lr, seed, r, reused in finished:
                plan.runs[seed][f"{lr:g}"] = r
                self.save_arm(claim, plan.name, seed, plan.runs[seed])
                ran, done = ran + (not reused), done + 1
                planned = max(planned, sum(p.planned() for p in plans))
                rate = (time.perf_counter() - started) / max(ran, 1)
                self.log(
                    f"[{claim.name}] {done}/{planned} {plan.name} lr {lr:g} seed {seed}: val {r['val_loss']:.4f}"
                    + (f", test EM {r['exact_match']:.3f}" if "exact_match" in r else "")
                    + (
                        "; reused (the same job ran for an earlier claim)"
                        if reused
                        else f"; {r['wall_seconds']:.1f} s, {r['tokens_seen']:,} tokens; "
                        f"ETA {rate * (planned - done) / 60:.1f} min"
                    )
                )
        if failed is not None:
            raise failed
        if ran:
            self.record_timing(claim, time.perf_counter() - started, ran, pool.jobs)
        return summarise(self, claim, seeds)

    def record_timing(self, claim: Claim, wall: float, ran: int, jobs: int) -> None:
        """Append this invocation's wall time to ``<results>/<claim>/timing.json`` (the report states the total)."""
        path = self.results / claim.name / "timing.json"
        sessions = json.loads(path.read_text(encoding="utf-8"))["sessions"] if path.is_file() else []
        sessions.append({"wall_seconds": round(wall, 1), "runs": ran, "jobs": jobs, "cpus": os.cpu_count()})
        path.write_text(
            json.dumps({"claim": claim.name, "sessions": sessions}, indent=1) + "\n", encoding="utf-8"
        )


@dataclass
class ArmPlan:
    """The runs of one arm variant and what is ready to train: seed 0's lr sweep (``n_lrs`` values of ``grid``, grown
    by :func:`next_lr` up to ``max_lrs`` while its best lr sits at its edge), then seeds 1.. at each of the sweep's
    :data:`FINALISTS` best lrs (the arm's lr is then chosen on the mean over seeds: :func:`choose_lr_over_seeds`)."""

    name: str
    arm: Arm
    head: bool
    grid: list[float]
    n_lrs: int
    max_lrs: int
    seeds: int
    # seed -> lr (``f"{lr:g}"``) -> run
    runs: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def sweep(self) -> list[float]:
        """Seed 0's lrs: the first ``n_lrs`` of the grid, grown while every one has run and the best is at an edge."""
        lrs = self.grid[: self.n_lrs]
        done = self.runs.get(0, {})
        while len(lrs) < self.max_lrs and all(f"{x:g}" in done for x in lrs):
            extra = next_lr(self.grid, lrs, choose_lr({f"{x:g}": done[f"{x:g}"] for x in lrs}))
            if extra is None:
                break
            lrs = [*lrs, extra]
        return lrs

    def ready(self) -> list[tuple[float, int]]:
        """(lr, seed) of the runs that can train now: the sweep's missing lrs, else the finalists' other seeds."""
        sweep = self.sweep()
        missing = [(lr, 0) for lr in sweep if f"{lr:g}" not in self.runs.get(0, {})]
        if missing:
            return missing
        return [
            (lr, s)
            for lr in finalists(self.runs[0])
            for s in range(1, self.seeds)
            if f"{lr:g}" not in self.runs.get(s, {})
        ]

    def planned(self) -> int:
        swept = len(self.sweep())
        return swept + (self.seeds - 1) * min(FINALISTS, swept)

    def finished(self) -> int:
        sweep, done = self.sweep(), self.runs.get(0, {})
        count = sum(f"{x:g}" in done for x in sweep)
        if count == len(sweep):
            count += sum(
                f"{x:g}" in self.runs.get(s, {}) for x in finalists(done) for s in range(1, self.seeds)
            )
        return count


class RunPool:
    """Where runs train: ``jobs`` worker processes of one thread each, or this process when ``jobs`` is 1.

    Runs of these sizes hardly use a second thread, so two runs side by side on two cores train at twice the rate of
    one (measured: a fine-tune 26.6 s alone, 26.9 s beside a pretraining run). Each worker builds its own
    :class:`Suite` on the same cache: the run memo and the arm files are per run and per arm, so workers never write
    the same file, and the bases are trained before any run needs them (:meth:`bases`)."""

    def __init__(self, suite: Suite, jobs: int) -> None:
        self.suite, self.jobs = suite, max(1, jobs)
        self._executor: ProcessPoolExecutor | None = None
        if self.jobs > 1:
            self._executor = ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start,
                initargs=(suite.scale, suite.cache, suite.results),
            )

    def submit(self, claim: Claim, arm_name: str, lr: float, seed: int) -> Future:
        if self._executor is not None:
            return self._executor.submit(_worker_run, claim.name, arm_name, lr, seed)
        done: Future = Future()
        done.set_result(_run_arm(self.suite, claim.name, arm_name, lr, seed))
        return done

    def wait(self, futures: list[Future]) -> set[Future]:
        return wait(futures, return_when=FIRST_COMPLETED).done

    def bases(self, names: list[str]) -> None:
        """Train the fine-tuning bases that are not cached yet, side by side."""
        self.suite.warmup_task(), self.suite.task()  # written here once, read by every worker
        if self._executor is None:
            for name in names:
                self.suite.base(name)
            return
        for future in [self._executor.submit(_worker_base, name) for name in names]:
            future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


_WORKER_SUITE: Suite | None = None


def _worker_start(scale: Scale, cache: Path, results: Path) -> None:
    import torch

    torch.set_num_threads(1)
    global _WORKER_SUITE
    _WORKER_SUITE = Suite(scale, cache, results)


def _worker_run(claim_name: str, arm_name: str, lr: float, seed: int) -> dict[str, Any]:
    assert _WORKER_SUITE is not None
    return _run_arm(_WORKER_SUITE, claim_name, arm_name, lr, seed)


def _worker_base(name: str) -> None:
    assert _WORKER_SUITE is not None
    _WORKER_SUITE.base(name)


def _run_arm(suite: Suite, claim_name: str, arm_name: str, lr: float, seed: int) -> dict[str, Any]:
    claim = CLAIMS_BY_NAME[claim_name]
    arm, head = next((a, h) for n, a, h in arm_variants(claim) if n == arm_name)
    return suite.run(claim, arm, head, lr, seed)


def next_lr(grid: list[float], swept: list[float], best: float) -> float | None:
    """The lr to add to a sweep whose ``best`` lr sits at its edge: the nearest unswept value of ``grid`` beyond
    that edge; None when ``best`` is inside the sweep or the grid has nothing beyond it."""
    if best == max(swept):
        beyond = [x for x in grid if x > best and x not in swept]
        return min(beyond) if beyond else None
    if best == min(swept):
        beyond = [x for x in grid if x < best and x not in swept]
        return max(beyond) if beyond else None
    return None


def _finite(run: dict[str, Any]) -> bool:
    return run["val_loss"] is not None and math.isfinite(run["val_loss"])


def choose_lr(runs: dict[str, dict[str, Any]]) -> float:
    """The lr of the lowest validation loss among ``runs`` (by lr; the task's validation rows for fine-tuning)."""
    return finalists(runs)[0]


FINALISTS = 2
"""The best lrs of seed 0's sweep that run on every seed: one seed's best can win by a hair and be unstable on the
other seeds (full fine-tuning's top lr did), so the arm's lr is chosen on the mean over seeds among these."""


def finalists(runs: dict[str, dict[str, Any]]) -> list[float]:
    """Seed 0's :data:`FINALISTS` best lrs, best first (validation loss; runs that diverged are left out)."""
    finite = {k: v for k, v in runs.items() if _finite(v)}
    if not finite:
        raise RuntimeError("no finished lr of the sweep has a finite validation loss")
    return [float(k) for k in sorted(finite, key=lambda k: finite[k]["val_loss"])[:FINALISTS]]


def choose_lr_over_seeds(by_seed: dict[int, dict[str, dict[str, Any]]]) -> float:
    """The arm's lr: among seed 0's finalists that ran on every seed in ``by_seed``, the one of the lowest mean
    validation loss (a seed that diverged counts as infinite); seed 0's best while no finalist has every seed."""
    complete = [lr for lr in finalists(by_seed[0]) if all(f"{lr:g}" in runs for runs in by_seed.values())]
    if not complete:
        return choose_lr(by_seed[0])
    return min(complete, key=lambda lr: mean_val_loss(by_seed, lr))


def mean_val_loss(by_seed: dict[int, dict[str, dict[str, Any]]], lr: float) -> float:
    """The mean validation loss at ``lr`` over the seeds that ran it (a diverged run counts as infinite)."""
    runs = [r[f"{lr:g}"] for r in by_seed.values() if f"{lr:g}" in r]
    return statistics.fmean(r["val_loss"] if _finite(r) else math.inf for r in runs)


# --- summaries and verdicts ----------------------------------------------------------------------------------------


METRICS = ("val_loss", "exact_match", "forgetting", "early_loss", "trained_params")


def summarise(suite: Suite, claim: Claim, seeds: int) -> dict[str, Any]:
    """Per arm: the chosen lr, the seeds run at it, mean and standard deviation of each metric; the verdicts."""
    arms: dict[str, Any] = {}
    for name, _, _ in arm_variants(claim):
        sweep = suite.load_arm(claim, name, 0)
        if not sweep:
            continue
        # Every seed run: ``seeds`` at least, more where a claim was given more (``--seeds``).
        ran = {
            int(p.stem.rsplit("-seed", 1)[1]) for p in (suite.results / claim.name).glob(f"{name}-seed*.json")
        }
        by_seed = {k: r for k in sorted(ran | set(range(seeds))) if (r := suite.load_arm(claim, name, k))}
        lr = choose_lr_over_seeds(by_seed)
        rows = [r[f"{lr:g}"] for r in by_seed.values() if f"{lr:g}" in r]
        entry: dict[str, Any] = {
            "lr": lr,
            "sweep": {k: v["val_loss"] for k, v in sweep.items()},
            "finalists": {f"{x:g}": mean_val_loss(by_seed, x) for x in finalists(sweep)},
            "seeds": len(rows),
            "tokens_seen": rows[0]["tokens_seen"],
            "params_total": rows[0]["params_total"],
            "params_active": rows[0]["params_active"],
            "trained_pct": rows[0]["trained_pct"],
            "curve": rows[0]["curve"],
        }
        for metric in METRICS:
            by_seed = {r["seed"]: r[metric] for r in rows if r.get(metric) is not None}
            if by_seed:
                values = list(by_seed.values())
                entry[metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                    "by_seed": {str(k): v for k, v in by_seed.items()},
                }
        arms[name] = entry
    verdicts = [verdict(c, arms) for c in claim.comparisons]
    return {"claim": claim.name, "scale": suite.scale.name, "arms": arms, "verdicts": verdicts}


EXACT_MATCH_FLOOR = 0.1
"""Below this exact match in both arms a comparison says nothing (equal at ~0 is not "matching")."""
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (a two-sided 95% interval) for ``df`` degrees of freedom (1.96 past the table)."""
    return _T_975.get(df, 1.96) if df >= 1 else math.inf


def verdict(c: Comparison, arms: dict[str, Any]) -> dict[str, Any]:
    """``reproduced`` when the 95% confidence interval of the difference a − b (Student's t; of the per-seed
    differences when both arms ran the same seeds, else of the two means with the smaller arm's degrees of freedom)
    lies on the paper's side of 0 (for ``approx``: inside ±``tolerance``), ``not reproduced`` when it lies on the
    other side (outside the tolerance), ``inconclusive`` otherwise or with fewer than 2 seeds per arm; ``not run``
    when an arm is missing; ``not like for like`` when the arms train different parts (``c.unlike``): the
    difference is shown, no verdict is drawn from it."""
    out = {
        "a": c.a,
        "b": c.b,
        "metric": c.metric,
        "expect": c.expect,
        "claim": c.claim,
        "tolerance": c.tolerance,
    }
    ma, mb = arms.get(c.a, {}).get(c.metric), arms.get(c.b, {}).get(c.metric)
    if ma is None or mb is None:
        return {**out, "verdict": "not run"}
    diff = ma["mean"] - mb["mean"]
    se = math.sqrt(ma["std"] ** 2 / ma["n"] + mb["std"] ** 2 / mb["n"])
    seeds = sorted(set(ma.get("by_seed", {})) & set(mb.get("by_seed", {})))
    if len(seeds) > 1 and len(seeds) == ma["n"] == mb["n"]:
        # Paired by seed: the same seed gives both arms the same data order, so the per-seed differences carry
        # less noise than two independent means.
        diffs = [ma["by_seed"][k] - mb["by_seed"][k] for k in seeds]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        out["paired"] = True
    df = len(seeds) - 1 if out.get("paired") else min(ma["n"], mb["n"]) - 1
    out.update(diff=diff, se=se, half_width=t_quantile_975(df) * se)
    if c.unlike:
        return {**out, "verdict": "not like for like", "why": c.unlike}
    if min(ma["n"], mb["n"]) < 2 and c.metric != "trained_params":
        return {**out, "verdict": "inconclusive", "why": "one seed"}
    if c.metric == "exact_match" and max(ma["mean"], mb["mean"]) < EXACT_MATCH_FLOOR:
        why = f"both arms below {EXACT_MATCH_FLOOR:g} exact match: the task is not learned at this scale"
        return {**out, "verdict": "inconclusive", "why": why}
    band = out["half_width"]
    if c.expect == "approx":
        if abs(diff) + band <= c.tolerance:
            return {**out, "verdict": "reproduced"}
        if abs(diff) - band > c.tolerance:
            return {**out, "verdict": "not reproduced"}
        return {**out, "verdict": "inconclusive", "why": "the 95% interval straddles the tolerance"}
    sign = -1.0 if c.expect == "less" else 1.0
    if sign * diff - band > 0:
        return {**out, "verdict": "reproduced"}
    if sign * diff + band < 0:
        return {**out, "verdict": "not reproduced"}
    return {**out, "verdict": "inconclusive", "why": "the 95% interval contains 0"}


def format_metric(entry: dict[str, Any], metric: str) -> str:
    m = entry.get(metric)
    if m is None:
        return "—"
    if metric == "trained_params":
        return f"{m['mean']:,.0f}"
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if m["n"] > 1 else f"{m['mean']:.4f}"


def claim_table(summary: dict[str, Any], claim: Claim) -> list[str]:
    """Markdown: one row per arm, then one row per comparison with its verdict. A chosen lr at the edge of its sweep
    is marked † (a wider sweep might find a better one); the other finalist lr follows in brackets."""
    pretrain = claim.kind == "pretrain"
    metrics = ["val_loss"] if pretrain else ["exact_match", "forgetting", "early_loss", "val_loss"]
    size = "params (total / active per token)" if pretrain else "trained params"
    head = (
        "| arm | lr (chosen; other finalist) | seeds | "
        + " | ".join(metrics)
        + f" | {size} | tokens seen per run (trainer) |"
    )
    lines = [head, "|" + "---|" * (5 + len(metrics))]
    for name, e in summary["arms"].items():
        cells = " | ".join(format_metric(e, m) for m in metrics)
        swept = [float(k) for k in e["sweep"]]
        edge = "†" if len(swept) > 1 and e["lr"] in (min(swept), max(swept)) else ""
        other = [k for k in e.get("finalists", {}) if float(k) != e["lr"]]
        edge += f" ({other[0]})" if other else ""
        if pretrain:
            params = f"{e['params_total'] / 1e6:.3f}M / {e['params_active'] / 1e6:.3f}M"
        else:
            params = f"{e.get('trained_params', {}).get('mean', 0):,.0f} ({e['trained_pct']:.2f}%)"
        lines.append(
            f"| {name} | {e['lr']:g}{edge} | {e['seeds']} | {cells} | {params} | {e['tokens_seen']:,} |"
        )
    lines += ["", "| claim | comparison | difference (a − b) | verdict |", "|---|---|---|---|"]
    for v in summary["verdicts"]:
        paired = ", paired by seed" if v.get("paired") else ""
        if "diff" not in v:
            diff = "—"
        elif math.isfinite(v["half_width"]):
            diff = f"{v['diff']:+.4f} ± {v['half_width']:.4f} (95% CI{paired})"
        else:
            diff = f"{v['diff']:+.4f} (one seed)"
        why = f" ({v['why']})" if v.get("why") else ""
        tol = f", tolerance {v['tolerance']:g}" if v["expect"] == "approx" else ""
        lines.append(
            f"| {v['claim']} | {v['a']} {_SYMBOL[v['expect']]} {v['b']} on {v['metric']}{tol} | {diff} "
            f"| {v['verdict']}{why} |"
        )
    return lines


_SYMBOL = {"less": "<", "greater": ">", "approx": "≈"}


def plot_claim(summary: dict[str, Any], path: Path, metric: str) -> None:
    """Left: seed 0's training-loss curves at each arm's chosen lr. Right: ``metric`` per arm, mean ± standard
    deviation over seeds (the dots are the seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, e in summary["arms"].items():
        if e["curve"]:
            steps, loss = zip(*e["curve"], strict=True)
            curves.plot(steps, loss, lw=1.1, label=f"{name} (lr {e['lr']:g})")
    curves.set_title(f"{summary['claim']} ({summary['scale']} scale): training loss, seed 0")
    curves.set_xlabel("step")
    curves.set_ylabel("train loss (nats)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    names = [n for n, e in summary["arms"].items() if metric in e]
    for i, name in enumerate(names):
        m = summary["arms"][name][metric]
        bars.bar(i, m["mean"], yerr=m["std"], color="tab:blue", alpha=0.6, capsize=4)
        values = list(m["by_seed"].values())
        bars.scatter([i] * len(values), values, color="black", s=10, zorder=3)
    if names:
        low = min(min(summary["arms"][n][metric]["by_seed"].values()) for n in names)
        high = max(max(summary["arms"][n][metric]["by_seed"].values()) for n in names)
        pad = 0.15 * (high - low or abs(high) or 1.0)
        bars.set_ylim(low - pad if metric == "val_loss" else min(0.0, low - pad), high + pad)
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    bars.set_ylabel(metric)
    bars.set_title(f"{metric}: mean ± std over seeds (dots: seeds)")
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(lines: list[str], width: int = 118) -> list[str]:
    """Prose lines wrapped to the docs' width; tables, headings and images kept as they are."""
    out: list[str] = []
    for line in lines:
        keep = not line or line.startswith(("|", "#", "!", "<!--"))
        out += [line] if keep else textwrap.wrap(line, width, break_on_hyphens=False, break_long_words=False)
    return out


def claim_cost(suite: Suite, claim: Claim) -> dict[str, Any]:
    """What a claim's current results cost: their runs, the sum of the runs' wall times (training and scoring, one
    thread each) and the wall time of the invocations that trained them (``timing.json``)."""
    runs = [
        r
        for name, _, _ in arm_variants(claim)
        for path in (suite.results / claim.name).glob(f"{name}-seed*.json")
        for r in suite.load_arm(claim, name, int(path.stem.rsplit("-seed", 1)[1])).values()
    ]
    timing = suite.results / claim.name / "timing.json"
    sessions = json.loads(timing.read_text(encoding="utf-8"))["sessions"] if timing.is_file() else []
    return {
        "runs": len(runs),
        "run_seconds": sum(r.get("wall_seconds", 0.0) for r in runs),
        "by_job": {job_key(r["job"]): r.get("wall_seconds", 0.0) for r in runs},
        "timed_runs": sum("wall_seconds" in r for r in runs),
        "wall_seconds": sum(x["wall_seconds"] for x in sessions),
        "jobs": sorted({x["jobs"] for x in sessions}),
        "cpus": sorted({x["cpus"] for x in sessions}),
    }


def cost_table(suite: Suite) -> list[str]:
    """The time each claim took here, and the bases' (the issue's budget: each claim under ~30 min, all under ~2 h)."""
    rows, total_wall, unique = [], 0.0, {}
    for claim in CLAIMS:
        c = claim_cost(suite, claim)
        if not c["runs"]:
            continue
        total_wall, unique = total_wall + c["wall_seconds"], {**unique, **c["by_job"]}
        timed = "" if c["timed_runs"] == c["runs"] else f" ({c['timed_runs']} of the runs timed)"
        workers = "/".join(map(str, c["jobs"])) or "-"
        cpus = "/".join(map(str, c["cpus"])) or "-"
        rows.append(
            f"| `{claim.name}` | {c['runs']} | {c['run_seconds'] / 60:.1f}{timed} | {c['wall_seconds'] / 60:.1f} "
            f"| {workers} on {cpus} cores |"
        )
    if not rows:
        return []
    bases = []
    for name in BASE_RECIPES:
        stages = [suite.pretrained_dir(name), suite.base_dir(name)]
        if all((d / "summary.json").is_file() for d in stages):
            seconds = sum(
                json.loads((d / "summary.json").read_text(encoding="utf-8"))["train_seconds"] for d in stages
            )
            bases.append(f"`{name}` {seconds / 60:.1f} min")
    return [
        "Cost on the machine that ran them (`--claim all`: every claim in the order of this page, so "
        "a run two claims share, like full fine-tuning or LoRA, trained in the first one and was reused by the "
        "later ones): 'run time' is the sum of the runs' own wall times (training and scoring, one thread each: what the claim "
        "would cost alone, a shared run counted in each claim that reports it, once in the last row), "
        "'wall' the elapsed time of the invocations that trained them (summed where a claim was resumed), "
        "with that many runs side by side"
        + (
            f"; the bases' training (pretraining and chat warm-up, once per machine): {', '.join(bases)}"
            if bases
            else ""
        )
        + ".",
        "",
        "| claim | runs | run time (min) | wall (min) | workers |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        f"| all | {len(unique)} | {sum(unique.values()) / 60:.1f} | {total_wall / 60:.1f} | |",
        "",
    ]


def write_report(suite: Suite, seeds: int, output: Path, plots: Path | None) -> str:
    """``docs/results.md``-style report of every claim with cached results; the others listed with their command."""
    s = suite.scale
    lines = [
        "# Reproductions of the plugins' paper claims",
        "",
        "Written by `benchmarks/reproduce.py --report` from the cached results in `benchmarks/results/reproduce/` "
        "(method: the script's docstring). Scale "
        f"`{s.name}`: dim {s.dim}, {s.n_layers} layers, sequence {s.seq_len}, global batch {s.batch}; pretraining "
        f"claims {s.pretrain_steps} steps ({s.pretrain_steps * s.batch * s.seq_len:,} tokens per arm), fine-tuning "
        f"claims {s.sft_steps} steps ({s.sft_steps * s.batch * s.seq_len:,} tokens per arm) on the generated SFT "
        f"task (add, reverse, upper, sort) ({s.train_rows} training rows, lr chosen on {s.val_rows} validation rows, exact match on "
        f"{s.test_rows} test rows); lr sweep of {s.n_lrs} values on seed 0, grown toward "
        f"its edge while the best lr sits there (up to {s.max_lrs} values), {seeds} seeds at its {FINALISTS} best lrs (more "
        "where a table's seeds column says so), the arm's lr being the one of the lower mean validation loss over the "
        "seeds; "
        "mean ± standard deviation over seeds; verdicts from the 95% confidence interval of the difference (Student's t, "
        "paired by seed where both arms ran the same seeds). One rank per run, fp32.",
        "",
        "How to read the tables: a verdict is about this scale only — tiny models, a few hundred thousand tokens per "
        "arm, where the papers trained billions of parameters on billions of tokens — so *not reproduced* means "
        "the claimed effect does not appear at this size, not that the method is broken (every plugin's math is "
        "tested against its reference separately). Pretraining claims choose each arm's lr on the validation loss "
        "they report (so slightly optimistic, for every arm alike); fine-tuning "
        "claims choose it on the task's validation rows and report exact match on separate test rows; their task loss (on "
        "the validation rows the lr was chosen on, so slightly optimistic for every arm alike) is the informative score "
        "where no arm learns the task to exact match. Every arm of a comparison sees the same data, validation "
        "rows, lr search and seeds (the same procedure on each arm's own grid: adapters' grids sit higher than "
        "full fine-tuning's, as in their papers — `FULL_LRS`, `ADAPTER_LRS`, `PISSA_LRS`, `MOLA_LRS` in the script — and every "
        "sweep grows toward the edge where its best sits); where the two arms train different parts (an adapter with the head frozen "
        "against full fine-tuning, which trains it) the row says *not like for like* and draws no verdict — "
        "the arm with `modules_to_save=[lm_head]` (+head) is the like-for-like one. † marks a "
        "chosen lr at the edge of its (grown) sweep. 'tokens seen' is the trainer's count (for fine-tuning: the loss "
        "tokens, the answers).",
        "",
        *cost_table(suite),
    ]
    for claim in CLAIMS:
        summary = summarise(suite, claim, seeds)
        lines += [f"## {claim_heading(claim)}", "", f"Claim: {claim.statement}.", ""]
        if not summary["arms"]:
            lines += [
                f"Not yet run (command: `python benchmarks/reproduce.py --claim {claim.name} --scale {s.name}`).",
                "",
            ]
            continue
        if claim.model is not None:
            shape = ", ".join(f"`{k}={v}`" for k, v in claim.model(s).items())
            lines += [
                f"Model: {s.n_layers} MoE layers of width {s.dim}, {shape}, `moe.route_norm=false` in every arm; "
                "each arm's own keys are in `CLAIMS` in `benchmarks/reproduce.py` (and in each result file's `job`).",
                "",
            ]

        if claim.kind == "sft":
            info = suite.base_info(claim.base)
            lines += [
                f"Base `{claim.base}` ({info['recipe']}): {info['params_total'] / 1e6:.2f}M parameters, "
                f"pretrained {info['steps']} steps ({info['tokens_seen']:,} tokens, validation loss "
                f"{info['val_loss']:.3f}), then a chat warm-up of {info['chat_steps']} steps on the tasks copy, "
                f"first, last and count ({info['chat_tokens_seen']:,} answer tokens; warm-up validation loss "
                f"{info['chat_val_loss']:.3f}). A model this small does not keep its corpus through the warm-up "
                f"(corpus validation loss {info['val_loss']:.2f} → {info['corpus_loss_start']:.2f} nats), so "
                "*forgetting* is measured on the base's previous skills: the loss on the warm-up tasks' validation "
                f"rows after the fine-tune minus before it ({info['skills_loss_start']:.3f} nats); the corpus loss "
                "after each fine-tune is in the result files (`corpus_forgetting`).",
                "",
            ]
        lines += claim_table(summary, claim)
        if plots is not None:
            png = plots / f"{claim.name}.png"
            plot_claim(summary, png, "val_loss" if claim.kind == "pretrain" else "exact_match")
            lines += ["", f"![{claim.name}]({os.path.relpath(png, output.parent)})"]
        missing = [a.name for a in claim.arms if a.name not in summary["arms"]]
        if missing:
            arms = ",".join(missing)
            lines += [
                "",
                f"Arms not yet run: {', '.join(missing)} (command: `python benchmarks/reproduce.py --claim "
                f"{claim.name} --arms {arms}`).",
            ]
        if s.name == "cpu":
            lines += claim_note(claim.name, summary)
        lines.append("")
    return "\n".join(_wrap(lines))


def results_digest(summary: dict[str, Any]) -> str:
    """A short hash of a claim's results: each arm's chosen lr, seeds and metric means (what a note explains)."""
    body = {
        arm: {"lr": e["lr"], "seeds": e["seeds"], **{m: round(e[m]["mean"], 4) for m in METRICS if m in e}}
        for arm, e in sorted(summary["arms"].items())
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def claim_note(
    name: str, summary: dict[str, Any], notes: dict[str, tuple[str, str]] | None = None
) -> list[str]:
    """The hand-written explanation of a claim's results (:data:`NOTES`), while the results are those it was written
    for; otherwise a line saying it is left out (an explanation of other numbers would mislead)."""
    notes = NOTES if notes is None else notes
    if name not in notes:
        return []
    written_for, note = notes[name]
    if written_for == (now := results_digest(summary)):
        return ["", note]
    return [
        "",
        f"(The explanation of this claim was written for other results (digest {written_for}, these are {now}) and "
        "is left out until it is rewritten: `NOTES` in `benchmarks/reproduce.py`.)",
    ]


# What the committed CPU results say beyond the statistics, written by hand after a run: (the digest of the results
# it was written for (results_digest), the text). The report includes a note only while its claim's results match.
NOTES: dict[str, tuple[str, str]] = {
    "coe": (
        "a0804f81",
        "Why: at 205k tokens per arm with 32 experts of hidden 32, CoE-2 in the block form that keeps `h` "
        "(the like-for-like comparison with the core MoE) is 0.04 ± 0.02 nats worse than top-4 MoE, on every "
        "seed: not reproduced at this scale. In the reference code's form (both arms without `h`) CoE's mean "
        "is 0.04 nats lower, but at the lr its seeds chose (4e-3: mean 5.64 against 5.69 at 2e-3) one seed "
        "reached 5.30 and the other two 5.77-5.84, so the interval is ± 0.58: inconclusive. The paper's gain "
        "(1.20 → 1.12 math validation loss) is for 64 experts and far longer training; this size cannot say "
        "whether it appears there. The ablation reproduces: with the outer residual (and a norm between "
        "iterations, so the second iteration is live) CoE is 0.12 nats worse than with the inner one, on "
        "every seed.",
    ),
    "deepseek_moe": (
        "793af0a8",
        "Why: seed 1 is unstable at 4e-3 for both GShard (6.00 against 5.47-5.59 for the other four seeds) "
        "and DeepSeekMoE (6.04 against 5.39-5.77), and 4e-3 is the lr both chose (DeepSeekMoE's two finalists"
        " tie at a mean of 5.628; at 2e-3 its spread is ± 0.05): paired by seed the two differ by +0.01 ± "
        "0.22 nats, inconclusive. The two parts split at this size: shared-expert isolation alone beats "
        "GShard by 0.28 ± 0.25 nats (reproduced; stable at 4e-3, 5.26-5.38 over five seeds), while "
        "fine-grained segmentation alone does not (+0.10 ± 0.27, worse in the mean: inconclusive), and adding"
        " the shared expert to segmentation is −0.09 ± 0.31 (inconclusive, through DeepSeekMoE's unstable "
        "seed). At 4 segments the routed experts are 32 wide, and 205k tokens may be too few for 32 such "
        "experts to specialise; the paper's gain is at 2B parameters.",
    ),
    "lora_vs_full": (
        "2e495652",
        "Why: on the base warmed up on the chat format, 400 steps teach the task to 0.33 ± 0.02 exact match "
        "with full fine-tuning (on 400 test rows the lr choice never saw). With the head trained "
        "(`lora.modules_to_save=[lm_head]`, the like-for-like comparison) LoRA r8 reaches 0.22 ± 0.02 and a "
        "task loss 0.18 ± 0.10 nats higher (0.82 against 0.65): both intervals lie mostly beyond their "
        "tolerance (0.05 exact match, 0.1 nats) but not wholly, so inconclusive, leaning toward not "
        "reproduced at this scale — LoRA r8 gives up about a third of full fine-tuning's exact match on a "
        "1.5M-parameter model. With the head frozen LoRA reaches 0.09 exact match and 1.50 nats more task "
        "loss than full fine-tuning, which trains its head: not like for like, no verdict. Every arm forgets "
        "most of the warm-up skills (their loss rises by 4.6-5.3 nats): a model this small fine-tuned on one "
        "task overwrites the previous ones.",
    ),
    "compacter": (
        "db0e36f7",
        "Why: Compacter (2,368 trained parameters, 0.16%, shared PHM rules and norms) does not come near full"
        " fine-tuning at this scale: with the head trained (`compacter.modules_to_save=[lm_head]`, like for "
        "like) it reaches 0.05 exact match against 0.33 and a task loss 0.65 ± 0.08 nats higher — not "
        "reproduced; with the head frozen it reaches 0.01 (not like for like, no verdict), its best lr at the"
        " top of its grid (0.1). The paper's result is for T5-base on GLUE with a trained classifier; at "
        "width 64 the bottleneck is 8 wide, which leaves the adapters little to work with.",
    ),
    "lift": (
        "d3345d9c",
        "Why: at the same trained-parameter budget as LoRA r8 (96k, the sparse mask of each matrix holding "
        "LoRA's count), LIFT beats LoRA on exact match with the head frozen (0.12 against 0.09, +0.03 ± 0.01:"
        " reproduced) and on task loss with the head trained (0.57 against 0.82 nats, −0.25 ± 0.19: "
        "reproduced); with the head frozen its task loss is lower in the mean (−0.05 ± 0.07, inconclusive). "
        "Against magnitude-only sparse fine-tuning at the same budget, the paper's key ablation, LIFT's "
        "low-rank filtering does not help here: 0.03 ± 0.02 nats worse in task loss with the head frozen (not"
        " reproduced), equal on exact match and with the head trained (inconclusive; magnitude-only with the "
        "head reached 0.35 exact match, above full fine-tuning's 0.33). Both sparse arms chose the top of "
        "their lr grid (3e-2) with the head trained. LIFT forgets no less than LoRA (+0.45 ± 0.61 nats, "
        "inconclusive).",
    ),
    "corda": (
        "7e35db18",
        "Why: knowledge-preserved CorDA matches LoRA's task loss (+0.03 ± 0.05 nats, inside the 0.1 "
        "tolerance: reproduced) and ties it on exact match with the head trained (0.24 against 0.22); with "
        "the head frozen neither arm learns the task to exact match (0.09 and 0.08). It does not forget less "
        "here: +0.33 ± 3.08 nats (inconclusive; one KPM seed forgets 6.1 nats, the other two 4.4). "
        "Instruction-previewed CorDA does not learn faster than LoRA: its training loss over the first "
        "quarter is 0.04 ± 0.11 nats lower (inconclusive) and it ends worse on the task (2.30 against 2.15 "
        "nats; 1.11 against 0.82 with the head trained). Adapting the principal components of the base's "
        "weights, IPM tolerates less lr than a zero-initialised LoRA at this size (its best lr is 3e-3; at "
        "1e-2 it ends 0.31 nats worse).",
    ),
    "soka": (
        "613a6946",
        "Why: with the energy threshold at 0.3 and the elbow, SoKA's per-layer Kronecker ranks come to 3-8 "
        "(mean 6.2) under a cap equal to LoRA r8's budget, so it trains 78,400 parameters against LoRA's "
        "96,256 (19% fewer: reproduced; the paper reports 25%) and reaches the same task loss (−0.01 ± 0.03 "
        "nats, within the 0.1 tolerance: reproduced). On exact match it is within 0.01 of LoRA with the head "
        "frozen (0.10 against 0.09), but neither arm learns the task to exact match there (inconclusive); "
        "with the head trained it reaches 0.25 against LoRA's 0.22, its best lr at the top of its grid "
        "(3e-2).",
    ),
    "mola": (
        "22160d6b",
        "Why: on the 8-layer dense base (warmed up like the MoE base) with all 7 projections adapted, the "
        "inverted triangle 2-4-6-8 matches 8-8-8-8's task loss with the head frozen (+0.01 ± 0.07 nats: "
        "reproduced, with 40 experts against 64 and 476k adapter parameters against 762k), but it does not "
        "beat the uniform 5-5-5-5 of the same 40 experts: equal task loss (+0.00 ± 0.07 nats) and, with the "
        "head trained, a lower exact match in the mean (0.35 against 0.42), with a spread over seeds as large"
        " as the difference (5-5-5-5: 0.29-0.51): inconclusive. With the head frozen no allocation learns the"
        " task to exact match (0.07-0.09). At this size, with 3 seeds, the allocation does not decide the "
        "result.",
    ),
    "hft": (
        "002cc773",
        "Why: HFT (at full fine-tuning's lr, 3e-3) reaches 0.23 ± 0.03 exact match against 0.33 ± 0.02 and a "
        "task loss 0.12 ± 0.17 nats higher: both intervals straddle their tolerance, so inconclusive, with "
        "the means short of full fine-tuning. It does not forget less here: 5.57 ± 0.33 nats against 5.29 ± "
        "0.83 (inconclusive). At this size HFT's always-trained embeddings and LM head are 70% of the model, "
        "so it trains 85% of the parameters, not the paper's ~50%: its frozen half is small here, which "
        "leaves it little to preserve.",
    ),
}


# --- plugin docs ---------------------------------------------------------------------------------------------------


DOC_OF_CLAIM = {
    "lora_vs_full": "lora",
    "hft": "hft",
    "corda": "corda",
    "lift": "lift",
    "soka": "soka",
    "compacter": "compacter",
    "deepseek_moe": "deepseek_moe",
    "coe": "chain_of_experts",
    "mola": "mola",
}
DOC_BEGIN = "<!-- reproduce:begin (written by benchmarks/reproduce.py --report; edits here are replaced) -->"
DOC_END = "<!-- reproduce:end -->"
_OLD_BEGIN, _OLD_END = "<!-- peft_methods:begin", "<!-- peft_methods:end -->"


def claim_heading(claim: Claim) -> str:
    return f"`{claim.name}`: {claim.paper}"


def anchor(heading: str) -> str:
    """The GitHub anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in heading.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def docs_section(suite: Suite, claim: Claim, seeds: int) -> str:
    """The ``## Measured`` section of a plugin page: a pointer to docs/results.md and the claim's verdicts."""
    summary = summarise(suite, claim, seeds)
    lines = [
        DOC_BEGIN,
        "## Measured",
        "",
        f"This plugin's paper claim ({claim.statement}) is the `{claim.name}` claim of `benchmarks/reproduce.py`: "
        "like-for-like arms, an lr sweep per arm, several seeds. Method, settings, every arm and the plot: "
        f"[docs/results.md](../results.md#{anchor(claim_heading(claim))}). Earlier figures on this page came from "
        "unlike setups and are removed.",
        "",
    ]
    if summary["arms"]:
        lines += [*claim_table(summary, claim), ""]
    else:
        lines.append(
            f"Not yet run (command: `python benchmarks/reproduce.py --claim {claim.name}`; then `--report`)."
        )
    return "\n".join(_wrap([*lines, DOC_END]))


def replace_measured(text: str, section: str) -> str:
    """``text`` with its measured section (between the markers, or from a ``## Measured`` heading to the next
    ``## `` heading) replaced by ``section``; appended when it has none."""
    for begin, end in ((DOC_BEGIN.split(" (")[0], DOC_END), (_OLD_BEGIN, _OLD_END)):
        start, stop = text.find(begin), text.find(end)
        if start >= 0 and stop > start:
            return text[:start] + section + text[stop + len(end) :]
    start = text.find("\n## Measured")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    stop = text.find("\n## ", start + 1)
    rest = "\n" + text[stop:] if stop >= 0 else "\n"
    return text[: start + 1] + section + rest


def update_plugin_docs(suite: Suite, seeds: int) -> list[Path]:
    written = []
    for claim in CLAIMS:
        doc = REPO / "docs" / "plugins" / f"{DOC_OF_CLAIM[claim.name]}.md"
        text = doc.read_text(encoding="utf-8")
        new = replace_measured(text, docs_section(suite, claim, seeds))
        if new != text:
            doc.write_text(new, encoding="utf-8")
            written.append(doc)
    return written


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--claim", default="", help=f"one of {', '.join(CLAIMS_BY_NAME)}, or all")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="every claim on a minuscule setting (a smoke test)"
    )
    parser.add_argument("--seeds", type=int, default=0, help="seeds per arm (default: the scale's, 3)")
    parser.add_argument("--arms", default="", help="comma-separated arms of the claim to run (default: all)")
    parser.add_argument("--lrs", type=int, default=0, help="lr values swept per arm (default: the scale's)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="runs trained side by side, one thread each (default: one per CPU core; 1 at --scale gpu)",
    )
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="bases, task data and the run memo")
    parser.add_argument(
        "--results", default="", help="result folder (default: benchmarks/results/reproduce[-gpu])"
    )
    parser.add_argument("--report", action="store_true", help="write the report (docs/results.md) and plots")
    parser.add_argument("--report-file", default="", help="report path (default: docs/results.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.claim = args.claim or "all"
    if not args.claim and not args.report:
        parser.error("give --claim NAME (or all), --quick, or --report")
    if args.claim and args.claim != "all" and args.claim not in CLAIMS_BY_NAME:
        parser.error(f"--claim {args.claim}: expected one of {', '.join(CLAIMS_BY_NAME)} or all")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    scale = SCALES["quick" if args.quick else args.scale]
    seeds = args.seeds or scale.seeds
    cache = Path(args.cache_dir).expanduser().resolve() / scale.name
    default_results = {"quick": cache / "results", "cpu": RESULTS, "gpu": RESULTS.with_name("reproduce-gpu")}
    results = Path(args.results).resolve() if args.results else default_results[scale.name]
    suite = Suite(scale, cache, results)
    claims = CLAIMS if args.claim == "all" else [CLAIMS_BY_NAME[args.claim]] if args.claim else []
    jobs = args.jobs or (1 if scale.name == "gpu" else os.cpu_count() or 1)
    pool = RunPool(suite, jobs) if claims else None
    try:
        if pool is not None:
            pool.bases(sorted({c.base for c in claims if c.kind == "sft"}))
        for claim in claims:
            arms = [a.strip() for a in args.arms.split(",") if a.strip()] or None
            seeds = args.seeds or claim.seeds_at(scale)
            summary = suite.run_claim(claim, seeds, arms, args.lrs, pool)
            print("\n".join([f"## {claim.name}", "", *claim_table(summary, claim), ""]), flush=True)
    finally:
        if pool is not None:
            pool.close()
    if args.report:
        default_report = {"quick": cache / "results.md", "cpu": DOCS_RESULTS, "gpu": results / "results.md"}
        output = Path(args.report_file).resolve() if args.report_file else default_report[scale.name]
        plots = results / "plots"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(write_report(suite, seeds, output, plots), encoding="utf-8")
        print(f"wrote {output}", flush=True)
        if scale.name == "cpu" and not args.report_file:  # the plugin pages show the committed CPU results
            for doc in update_plugin_docs(suite, seeds):
                print(f"updated {doc.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
