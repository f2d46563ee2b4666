"""The training job: build in order (config → plugins → model → transforms → trainable set → parallelize → optimizer),
then the step loop with hooks, evaluation, checkpoints and the end-of-run report.

Build order and why: ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from framework.checkpoint import CheckpointStore, RunLock, acquire_run_lock
from framework.comm import collectives as C
from framework.config import ConfigError, JobConfig, check_world
from framework.config.job import save_resolved
from framework.data import MicroBatchStream, build_pretrain_datasets, load_tokenizer, unigram_entropy
from framework.engines import Engine, NativeEngine
from framework.hooks import PluginManager
from framework.observe import console
from framework.observe.metrics import MetricsWriter, read_metrics
from framework.observe.mfu import mfu, peak_tflops
from framework.observe.progress import ProgressBar
from framework.parallel.mesh import ParallelLayout, build_meshes
from framework.parallel.setup import DistInfo, set_deterministic
from framework.train.loss import IGNORE_INDEX, count_loss_tokens, lm_loss_sum
from framework.train.optim import (
    apply_group_settings,
    build_optimizer,
    build_scheduler,
    group_settings,
    load_scheduler_state,
    optim_changes,
)
from framework.train.signals import StopRequested, StopSignals


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model being trained."""


_NOT_SHAPE_KEYS = {("model", "init_from")}
"""``model``/``moe`` keys that do not change the model's shape (a resumed run loads its own weights anyway)."""

# Config keys whose change alters the order in which samples are drawn.
_ORDER_KEYS = (
    ("train", "seed"),
    ("train", "global_batch_size"),
    ("data", "paths"),
    ("data", "weights"),
    ("data", "seq_len"),
    ("data", "val_fraction"),
)


@dataclass
class StepResult:
    loss: float
    aux: dict[str, float]
    grad_norm: float
    tokens: int
    seconds: float


@dataclass
class RunState:
    step: int = 0
    samples_consumed: int = 0
    started: float = field(default_factory=time.time)
    tokens_seen: int = 0


class Trainer:
    """One training job on this rank. Construct, then :meth:`run`."""

    def __init__(self, config: JobConfig, plugins: PluginManager, dist_info: DistInfo) -> None:
        self.config = config
        self.pm = plugins
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = config.run_dir
        self.store = CheckpointStore(
            self.run_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            required_meta=("samples_consumed", "world_size", "config"),
        )
        self.run_lock: RunLock | None = None
        self.layout = ParallelLayout.from_config(
            config.parallel, dist_info.world_size, config.model, config.moe, config.data.seq_len
        )
        self.accumulation = check_world(config, self.layout.dp)
        self.state = RunState()
        self.stop = StopSignals(config.checkpoint.save_on_signals, grace_s=config.parallel.timeout_s)
        self.stop_after_step = False
        self.collate: Callable[[list[Any]], Any] | None = None  # set for SFT data (triples with position ids)

    # --- build ----------------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Everything before the first step (collective). On failure the run folder is released again."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.config
        set_deterministic(
            cfg.train.deterministic, self.device
        )  # also where a job is built without launch.train
        self.meshes = build_meshes(self.layout, self.device)
        self.dp_rank, self.dp_size = self.meshes.dp_rank_and_size()
        if self.layout.is_parallel:
            console.info(f"parallel layout: {self.layout.describe()} on {self.layout.world} ranks")
        C.run_on_rank0("creating the run folder", self._create_run_dir)
        self.resume_from = self._find_resume_point()
        self._build_data()
        self._build_model()
        self.pm.hook.expertrain_after_parallelize(
            model=self.raw_model, config=cfg, resumed=self.resume_from is not None
        )
        if cfg.train.engine == "deepspeed" and self.meshes.ep is not None:
            from framework.engines.deepspeed_engine import expert_parallel_params, mark_expert_params

            mark_expert_params(expert_parallel_params(self.raw_model), self.layout.ep)
        plugin_groups = self.pm.param_groups(self.raw_model, cfg)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, plugin_groups, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.pm.hook.expertrain_after_optimizer(model=self.model, optimizer=self.optimizer, config=cfg)
        self.engine = self._build_engine()
        self.model = self.engine.model
        if self.resume_from is not None:
            C.run_agreed("loading the checkpoint", lambda: self._load_checkpoint(self.resume_from))
        self.train_stream = MicroBatchStream(
            self.train_ds,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            start_sample=self.state.samples_consumed,
            # Pretraining epochs after the first: a permutation of their own (the dataset is one pass, whatever
            # train.steps is). SFT sets keep repeating their order, as before.
            seed=cfg.train.seed if self.collate is None else None,
            shuffle_first_epoch=False,
            **self._batch_format(),
        )

    def _build_engine(self) -> Engine:
        """Gradient reduction, clipping and the optimizer step: DDP/FSDP2 here, or DeepSpeed ZeRO (framework/engines)."""
        if self.config.train.engine == "deepspeed":
            from framework.engines.deepspeed_engine import DeepSpeedEngine

            return DeepSpeedEngine(
                self.raw_model, self.optimizer, self.config, self.accumulation, self.device, self.meshes.ep
            )
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        return NativeEngine(
            self.model, self.optimizer, max_norm, raw_model=self.raw_model, layout=self.layout
        )

    def _create_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Held by rank 0 for the life of the job: a second job on this run.dir stops with one line naming the holder.
        self.run_lock = acquire_run_lock(self.run_dir)
        save_resolved(self.config, self.run_dir / "config.yaml")

    def close(self) -> None:
        """Release the run folder (the lock also goes when the process exits, however it exits)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _find_resume_point(self) -> Path | None:
        if not self.config.checkpoint.resume:
            return None
        latest = self.store.latest_verified(self.config.checkpoint.on_damaged)  # collective: ranks agree
        if latest is None:
            return None
        meta = self.store.read_meta(latest)
        self._check_compatible(meta, latest)
        return latest

    def _check_compatible(self, meta: dict[str, Any], path: Path) -> None:
        saved = meta.get("config", {})
        now = self.config.to_dict()
        diffs = [
            f"{section}.{k}: checkpoint {v!r}, config {now[section].get(k)!r}"
            for section in ("model", "moe")
            for k, v in saved.get(section, {}).items()
            if now[section].get(k) != v and (section, k) not in _NOT_SHAPE_KEYS
        ]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {path} was saved for another model shape ({'; '.join(diffs[:4])}); "
                "use the job's original model settings, or start a new run with another run.dir "
                "(or checkpoint.resume=false)"
            )
        changed = [f"{s}.{k}" for s, k in _ORDER_KEYS if saved.get(s, {}).get(k) != now[s].get(k)]
        if changed:
            console.warn(
                f"resuming {path.name} with changed {', '.join(changed)}: the sample order after step "
                f"{meta['step']} differs from the original run's"
            )

    def _build_data(self) -> None:
        cfg = self.config
        if cfg.sft.train_files and cfg.data.tokenizer:
            # SFT with a tokenizer folder (ours, or a Hugging Face model's): no pretraining corpus is involved.
            from framework.interop.hf.tokenizer import load_hf_tokenizer

            self.tokenizer = C.run_agreed(
                "loading the tokenizer", lambda: load_hf_tokenizer(cfg.data.tokenizer)
            )
        else:
            # Rank 0 prepares (and caches) the embedded corpus and tokenizer; the others then read the cache.
            C.run_on_rank0("preparing the data", lambda: load_tokenizer(cfg.data) and None)
            self.tokenizer = C.run_agreed(
                "loading the tokenizer", lambda: load_tokenizer(cfg.data, progress=False)
            )
        C.run_on_rank0(
            "saving the tokenizer", lambda: self.tokenizer.save(self.run_dir / "tokenizer") and None
        )
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                cfg.model.vocab_size,
                f"expected at least the tokenizer's vocabulary size {self.tokenizer.vocab_size}",
            )
        if cfg.sft.train_files:
            from framework.data.sft import build_sft_datasets, collate_sft

            self.collate = collate_sft
            self.train_ds, self.val_ds = C.run_agreed(
                "building the SFT datasets",
                lambda: build_sft_datasets(cfg.sft, self.tokenizer, cfg.data.seq_len),
            )
            if C.rank() == 0:
                for ds in (self.train_ds, self.val_ds):
                    if ds is not None:
                        console.info(ds.stats.summary())
            return
        # The validation text depends on neither train.seed nor the data-parallel size (see evaluate).
        val_samples = cfg.train.eval_batches * cfg.train.micro_batch_size
        self.train_ds, self.val_ds = C.run_agreed(
            "building the datasets",
            lambda: build_pretrain_datasets(
                cfg.data,
                cfg.data.seq_len,
                cfg.train.seed,
                None,  # one pass over the data, not train.steps' worth: a longer run keeps the sample order
                val_samples,
                self.tokenizer,
                val_seed=cfg.data.val_seed,
                vocab_size=cfg.model.vocab_size,
            ),
        )

    def _build_model(self) -> None:
        from framework.train.assembly import assemble_model, describe

        assembled = assemble_model(
            self.config, self.pm, self.meshes, self.device, resuming=self.resume_from is not None
        )
        self.raw_model, self.model = assembled.raw, assembled.model
        self.init_bytes_read = assembled.init_bytes_read
        self.param_counts = assembled.param_counts
        self.flops_per_token = assembled.flops_per_token
        bf16 = self.config.train.dtype == "bf16" or self.config.parallel.param_dtype == "bf16"
        self.peak_tflops = peak_tflops(self.device, "bf16" if bf16 else "fp32")
        console.info(describe(assembled))

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _state(self, targets: bool = False) -> dict[str, Any]:
        """What a checkpoint holds (``targets``: tensors of the right shapes to load into). Both engines give the
        model and optimizer state in one parameter-name keyed format, so a run resumes under either engine."""
        model_sd, optim_sd = self.engine.state_targets() if targets else self.engine.state_dicts()
        plugin_state = self.pm.plugin_state_dicts(self.raw_model, self.config)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "plugins": plugin_state,
        }

    def save_checkpoint(self) -> Path:
        meta = {
            "samples_consumed": self.state.samples_consumed,
            "tokens_seen": self.state.tokens_seen,
            "world_size": self.dist.world_size,
            "engine": self.engine.name,
            "config": self.config.to_dict(),
        }
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return self.store.save(self.state.step, self._state(), meta, rng)

    def _load_checkpoint(self, path: Path) -> None:
        target = self._state(targets=True)
        meta = self.store.read_meta(path)
        self._check_tensor_shapes(path, target["model"], meta.get("config", {}))
        state, meta, rng = self.store.load(path, target)
        job_settings = group_settings(self.scheduler.optimizer)
        self.engine.load_state_dicts(state["model"], state["optim"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        apply_group_settings(self.scheduler, job_settings)  # the job's optim section wins, never a mix
        saved_optim = meta.get("config", {}).get("optim", {})
        saved_steps = int(meta.get("config", {}).get("train", {}).get("steps", self.config.train.steps))
        steps = (saved_steps, self.config.train.steps)
        for line in optim_changes(saved_optim, self.config.optim, int(meta["step"]), steps):
            console.info(line)
        self.pm.load_plugin_state_dicts(state.get("plugins", {}), self.raw_model, self.config)
        self.state.step = int(meta["step"])
        self.state.samples_consumed = int(meta["samples_consumed"])
        self.state.tokens_seen = int(meta.get("tokens_seen", 0))
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        else:
            console.warn(
                f"no saved RNG state for rank {self.dist.rank} (world size changed); dropout noise will differ",
                True,
            )
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        console.info(f"resumed from {path} at step {self.state.step}")

    def _check_tensor_shapes(self, path: Path, model_sd: dict[str, Any], saved: dict[str, Any]) -> None:
        """Every model tensor of this job must exist in the checkpoint with the same (global) shape. Plugin options
        can change shapes too (e.g. ``deepseek_moe.segments``): the message names the options that changed."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from framework.checkpoint import SafeFileSystemReader

        stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
        problems = []
        for name, tensor in model_sd.items():
            meta = stored.get(f"model.{name}")
            if not isinstance(meta, TensorStorageMetadata):
                problems.append(f"{name}: not in the checkpoint")
            elif tuple(meta.size) != tuple(tensor.shape):
                problems.append(f"{name}: {tuple(meta.size)} there, {tuple(tensor.shape)} here")
        if not problems:
            return
        now = self.config.to_dict()
        from framework.config.sections import CORE_SECTIONS

        core = set(CORE_SECTIONS)
        changed = (
            [f"plugins: {saved.get('plugins')} -> {now.get('plugins')}"]
            if saved.get("plugins") != now.get("plugins")
            else []
        )
        for section in sorted((set(saved) | set(now)) - core - {"plugins"}):
            before, after = saved.get(section) or {}, now.get(section) or {}
            if isinstance(before, dict) and isinstance(after, dict):
                changed += [
                    f"{section}.{k}: {before.get(k)!r} -> {after.get(k)!r}"
                    for k in sorted(set(before) | set(after))
                    if before.get(k) != after.get(k)
                ]
        hint = f"; changed since it was saved: {', '.join(changed[:6])}" if changed else ""
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this job's model ({'; '.join(problems[:3])}"
            f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}){hint}. Resume with the options the run "
            "was saved with, or start a new run (another run.dir, or checkpoint.resume=false)"
        )

    # --- steps ----------------------------------------------------------------------------------------------------

    def _batch_format(self) -> dict[str, Any]:
        """How a micro-batch stream groups samples: pretraining pairs, or the SFT collate (with position ids)."""
        return {"collate": self.collate} if self.collate is not None else {"as_pairs": True}

    def _to_device(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input_ids, labels[, position_ids])`` on the training device; packed SFT batches carry positions that
        restart per sample (the model masks attention across samples from them)."""
        input_ids, labels = batch[0].to(self.device), batch[1].to(self.device)
        position_ids = batch[2].to(self.device) if len(batch) > 2 else None
        return input_ids, labels, position_ids

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> StepResult:
        cfg = self.config
        t0 = time.perf_counter()
        self.pm.hook.expertrain_step_begin(
            step=step, model=self.raw_model, optimizer=self.optimizer, config=cfg
        )
        micro_batches = self.train_stream.next_step()
        local_tokens = sum(count_loss_tokens(batch[1]) for batch in micro_batches)
        # One all-reduce carries the token count and whether any rank was signalled to stop (after this step).
        counts = C.all_reduce_sum(torch.tensor([local_tokens, int(self.stop.pending)], dtype=torch.int64))
        self.stop_after_step = int(counts[1]) > 0
        # Ranks of one tensor-parallel group share their micro-batches: count those tokens once.
        global_tokens = int(counts[0]) // self.layout.tp
        # DDP and FSDP average gradients over data-parallel ranks: scale so the result is the global token mean.
        lm_scale = self.dp_size / max(global_tokens, 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_totals: dict[str, float] = {}
        self.model.train()
        for i, batch in enumerate(micro_batches):
            input_ids, labels, position_ids = self._to_device(batch)
            last = i == len(micro_batches) - 1
            with self.engine.micro_batch(last):
                with self._autocast():
                    logits, lm_sum = self._forward_loss(input_ids, labels, position_ids)
                    extra = self._extra_losses(input_ids, logits)
                objective = (
                    lm_sum * lm_scale
                    + sum(extra.values(), torch.zeros((), device=self.device)) / self.accumulation
                )
                self.engine.backward(objective)
            loss_sum += lm_sum.detach().double().cpu()
            for k, v in extra.items():
                aux_totals[k] = aux_totals.get(k, 0.0) + float(v.detach()) / self.accumulation
        self.engine.finish_gradients()
        self.pm.hook.expertrain_after_backward(step=step, model=self.raw_model, config=cfg)
        grad_norm = self.engine.step()  # clip, optimizer step, zero the gradients
        self.scheduler.step()
        self._update_routing(step)
        self.pm.hook.expertrain_after_optimizer_step(
            step=step, model=self.raw_model, optimizer=self.optimizer, config=cfg
        )
        totals = torch.tensor([float(loss_sum), *aux_totals.values()], dtype=torch.float64)
        C.all_reduce_sum(totals)
        loss = float(totals[0]) / self.layout.tp / max(global_tokens, 1)
        # Summed over every rank: data-parallel ranks hold different micro-batches (averaged), tensor-parallel
        # ranks shares of the same micro-batch's aux losses (summed).
        aux = {k: float(v) / self.dp_size for k, v in zip(aux_totals, totals[1:].tolist())}
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping without saving. "
                "The last good checkpoint is untouched: lower optim.lr, raise optim.warmup_steps or enable "
                "optim.grad_clip, then rerun to resume from it"
            )
        return StepResult(loss, aux, grad_norm, global_tokens, time.perf_counter() - t0)

    def _forward_loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward one micro-batch; returns its logits ``[B, S, V]`` (``None`` when the LM head ran only at the
        labelled positions) and the summed LM loss.

        The head runs only where a label is (SFT: the answers) unless every position has one, a plugin's
        ``expertrain_extra_losses`` asks for the logits, or tensor parallelism shards the head's input."""
        keep = labels != IGNORE_INDEX
        if self._head_at_labels and not bool(keep.all()):
            logits_NV = self.model(input_ids, position_ids, logits_at=keep)
            return None, lm_loss_sum(logits_NV.unsqueeze(0), labels[keep].unsqueeze(0))
        logits = self.model(input_ids, position_ids)
        return logits, lm_loss_sum(logits, labels)

    @property
    def _head_at_labels(self) -> bool:
        if self.layout.tp > 1:
            return False
        impls = self.pm.hook.expertrain_extra_losses.get_hookimpls()
        return not any("logits" in impl.argnames for impl in impls)

    def _extra_losses(self, input_ids: torch.Tensor, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = dict(self.raw_model.aux_losses())
        for name, value in self.pm.merge_extra_losses(self.raw_model, input_ids, logits, self.config).items():
            if name in losses:
                raise ValueError(
                    f"extra loss '{name}' is also a core MoE loss; a plugin must use another name"
                )
            losses[name] = value
        return losses

    def _update_routing(self, step: int) -> None:
        """Exact int64 expert counts of this step, summed over every rank that saw tokens; aux-free bias update."""
        layers = self.raw_model.moe_layers()
        if not layers:
            self.last_counts = []
            return
        # One all-reduce for every layer and routing site (shapes may differ: [E] or [sites, E]).
        per_layer = [layer.consume_expert_counts().to("cpu", torch.int64) for layer in layers]
        flat = torch.cat([c.reshape(-1) for c in per_layer])
        C.all_reduce_sum(flat)
        counts = [c.view_as(orig) for c, orig in zip(flat.split([c.numel() for c in per_layer]), per_layer)]
        for layer, c in zip(layers, counts):
            layer.update_expert_bias(c.to(self.device))  # a no-op without aux-loss-free balancing
        self.last_counts = counts
        self.last_a2a_rows = sum(_take_remote_rows(layer) for layer in layers if hasattr(layer, "dispatcher"))

    def routing_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        layers = self.raw_model.moe_layers() if getattr(self, "last_counts", None) else []
        for i, (layer, c) in enumerate(zip(layers, self.last_counts)):
            c = c.double()
            if c.dim() == 1:
                sites = [(f"moe/layer{i}", c)]
            else:  # several routing sites (e.g. Chain-of-Experts iterations): one panel each
                names = layer.routing_site_names()
                sites = [(f"moe/layer{i}/{names[r]}", c[r]) for r in range(c.shape[0])]
            for prefix, c_E in sites:
                for e, v in enumerate(c_E.tolist()):
                    out[f"{prefix}/tokens_e{e}"] = v
                out[f"{prefix}/max_over_mean"] = float(c_E.max() / c_E.mean().clamp_min(1e-9))
        if self.layout.ep > 1:
            # (token, expert) rows this rank sent to other expert-parallel ranks in the last step's forwards, and
            # the bytes of one direction (dispatch); combine sends as many back, backward repeats both.
            rows = getattr(self, "last_a2a_rows", 0)
            elem = 2 if self.config.train.dtype == "bf16" else 4
            out["moe/a2a_remote_rows"] = float(rows)
            out["moe/a2a_dispatch_MB"] = rows * self.config.model.dim * elem / 1e6
        return out

    # --- evaluation and sampling ----------------------------------------------------------------------------------

    def _discard_routing_state(self) -> None:
        """Forget the aux losses and expert counts of forwards that are not training (they must not move the bias)."""
        self.raw_model.discard_routing_state()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per token over the first ``train.eval_batches`` micro-batches of the validation set.

        The micro-batches are the same for every data-parallel size: batch ``k`` goes to rank ``k % dp``. A rank left
        without one in the last round (``eval_batches`` not a multiple of dp) runs batch 0 again and drops the result,
        so every rank makes the same number of forward passes (FSDP, tensor and expert parallelism need that).
        """
        cfg = self.config
        if self.val_ds is None:
            return None
        self.model.eval()
        stream = MicroBatchStream(
            self.val_ds,
            global_batch_size=cfg.train.micro_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            **self._batch_format(),
        )
        batches = list(zip(range(cfg.train.eval_batches), stream))
        rounds = -(-len(batches) // self.dp_size)
        total = torch.zeros(2, dtype=torch.float64)
        for index in range(self.dp_rank, rounds * self.dp_size, self.dp_size):
            counted = index < len(batches)
            input_ids, labels, position_ids = self._to_device(batches[index if counted else 0][1])
            with self._autocast():
                _, lm_sum = self._forward_loss(input_ids, labels.to(self.device), position_ids)
            if counted:
                total[0] += float(lm_sum)
                total[1] += count_loss_tokens(labels)
        self._discard_routing_state()
        C.all_reduce_sum(total)
        self.model.train()
        return float(total[0] / total[1].clamp_min(1))

    @torch.no_grad()
    def sample_text(
        self, prompt: str = "def ", tokens: int = 48, temperature: float = 0.8, top_k: int = 40
    ) -> str:
        """Top-k sampling with a generator seeded by ``train.seed``, so every rank draws the same tokens (FSDP runs
        each forward on all ranks); shown on rank 0."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.train.seed)
        ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long, device=self.device)
        for _ in range(tokens):
            window = ids[:, -self.config.data.seq_len :]
            last = window.shape[1] - 1
            # Tensor parallelism splits the sequence evenly: pad on the right (causal attention leaves the real
            # positions unchanged) to a multiple of tp.
            pad = -window.shape[1] % self.layout.tp
            if pad:
                window = torch.cat([window, window.new_full((1, pad), self.tokenizer.pad)], dim=1)
            with self._autocast():
                logits = self.model(window)
            if isinstance(logits, DTensor):  # vocabulary-parallel under tensor parallelism
                logits = logits.full_tensor()
            top = torch.topk(logits[0, last].float().cpu() / temperature, top_k)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            nxt = top.indices[choice].view(1, 1).to(self.device)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == self.tokenizer.eod:
                break
        self._discard_routing_state()
        self.model.train()
        return self.tokenizer.decode(ids[0].tolist())

    # --- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train from the resume point to ``train.steps``, then evaluate and report; releases the run folder."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        if self.state.step >= cfg.train.steps:
            if C.broadcast_object((self.run_dir / "summary.json").is_file()):  # rank 0's view: ranks agree
                summary = self._previous_summary()
                console.info(
                    f"run {self.run_dir} is already complete ({self.state.step}/{cfg.train.steps} steps)"
                )
                return summary
            # Killed after its final checkpoint but before its report: evaluate the loaded model and report.
            console.info(
                f"run {self.run_dir} finished training ({self.state.step}/{cfg.train.steps} steps) but has no "
                "summary.json: evaluating the final checkpoint and writing the report"
            )
            return self._finish(self.evaluate(), 0.0, 0)
        metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, resume_step=self.state.step)
        bar = ProgressBar(cfg.train.steps, self.state.step, cfg.logging.progress)
        try:
            with self.stop:
                last_val, train_time, steps_run = self._loop(metrics, bar)
        finally:
            bar.close()
            metrics.close()
        return self._finish(last_val, train_time, steps_run)

    def _loop(self, metrics: MetricsWriter, bar: ProgressBar) -> tuple[float | None, float, int]:
        """The steps from the resume point to ``train.steps``; returns the last validation loss, the seconds spent in
        steps and how many ran. Raises :class:`StopRequested` after a step during which any rank was signalled."""
        cfg = self.config
        last_val: float | None = None
        train_time = 0.0
        steps_run = 0
        for step in range(self.state.step + 1, cfg.train.steps + 1):
            result = self.train_step(step)
            train_time += result.seconds
            steps_run += 1
            self.state.step = step
            self.state.samples_consumed += cfg.train.global_batch_size
            self.state.tokens_seen += result.tokens
            tok_s = result.tokens / max(result.seconds, 1e-9)
            record: dict[str, Any] = {
                "step": step,
                "loss": result.loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": result.grad_norm,
                "tokens_per_s": tok_s,
                "tokens_seen": self.state.tokens_seen,
                "model_tflops_per_s": self.flops_per_token * tok_s / 1e12,
            }
            step_mfu = mfu(self.flops_per_token, tok_s / self.dist.world_size, self.peak_tflops)
            if step_mfu is not None:
                record["mfu"] = step_mfu
            record.update({f"loss/{k}": v for k, v in result.aux.items()})
            if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last_val = self.evaluate()
                if last_val is not None:
                    record["val_loss"] = last_val
                    record["val_ppl"] = math.exp(min(last_val, 50.0))
                    bar.write(f"step {step}: val_loss {last_val:.4f} (ppl {record['val_ppl']:.1f})")
            if step % cfg.logging.log_every == 0 or "val_loss" in record or step == cfg.train.steps:
                record.update(self.routing_metrics())
                record.update(self.pm.merge_metrics(step, self.raw_model, cfg))
                metrics.write(record)
            bar.update(result.loss, tok_s)
            saved = None
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                step == cfg.train.steps and cfg.checkpoint.save_final
            ):
                saved = self.save_checkpoint()
            if self.stop_after_step and step < cfg.train.steps:
                saved = saved or self.save_checkpoint()
                name = self.stop.received.name if self.stop.received else "a signal to another rank"
                raise StopRequested(name, step, saved.name)
        return last_val, train_time, steps_run

    def _finish(self, val_loss: float | None, train_time: float, steps_run: int) -> dict[str, Any]:
        cfg = self.config
        baseline = (
            None
            if self.val_ds is None or self.config.sft.train_files
            else float(C.run_on_rank0("measuring the unigram baseline", lambda: unigram_entropy(self.val_ds)))
        )
        sample = self.sample_text(tokens=cfg.train.sample_tokens) if cfg.train.sample_tokens else ""
        tokens_per_s = (steps_run * cfg.train.global_batch_size * cfg.data.seq_len) / max(train_time, 1e-9)
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "val_loss": val_loss,
            "unigram_entropy": baseline,
            "gap_below_unigram": None if val_loss is None or baseline is None else baseline - val_loss,
            "train_seconds": train_time,
            "tokens_per_s": tokens_per_s,
            "params_total": self.param_counts["total"],
            "params_active": self.param_counts["active_per_token"],
            "model_tflops_per_s": self.flops_per_token * tokens_per_s / 1e12,
            "mfu": mfu(self.flops_per_token, tokens_per_s / self.dist.world_size, self.peak_tflops),
            "sample": sample,
            "lines": [],
        }
        if cfg.sft.eval_exact_match:
            accuracy = C.run_on_rank0("exact-match evaluation", self._exact_match)
            summary["exact_match"] = accuracy
            if accuracy is not None:
                summary["lines"].append(
                    f"exact match     {accuracy:.3f} on {cfg.sft.eval_exact_match} rows of {cfg.sft.val_file} "
                    "(greedy)"
                )
        self.pm.hook.expertrain_train_end(model=self.raw_model, summary=summary, config=cfg)
        if C.rank() == 0:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            if cfg.logging.plots:
                # Imported here: matplotlib costs ~0.6 s at start-up, and only rank 0 plots.
                from framework.observe.plots import plot_expert_load, plot_loss

                plot_loss(records, self.run_dir / "loss.png", baseline)
                plot_expert_load(records, self.run_dir / "expert_load.png")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        console.info(format_summary(summary))
        return summary

    def _exact_match(self) -> float | None:
        """Greedy answers to the first ``sft.eval_exact_match`` rows of ``sft.val_file`` (rank 0, one process): with
        the training model when it is whole on this rank, else with the final checkpoint rebuilt unsharded."""
        from framework.data.sft import BadRow, ChatTokenizer, read_rows
        from framework.inference.generate import exact_match_accuracy

        cfg = self.config.sft
        rows = [{"messages": item[1]} for item in read_rows(cfg.val_file) if not isinstance(item, BadRow)]
        rows = rows[: cfg.eval_exact_match]
        sharded = any(isinstance(p, DTensor) for p in self.raw_model.parameters())
        model: Any = self.raw_model
        if sharded:
            latest = self.store.latest()
            if latest is None:
                console.warn(
                    "exact-match evaluation skipped: the model is sharded and no checkpoint was saved"
                )
                return None
            from framework.checkpoint.export import load_model

            model = load_model(latest)[0]
        chat = ChatTokenizer.from_dir(self.run_dir / "tokenizer")
        with self._autocast():
            accuracy, _ = exact_match_accuracy(model, chat, rows, cfg.eval_max_new_tokens)
        return accuracy

    def _previous_summary(self) -> dict[str, Any]:
        """The report a finished run wrote (``summary.json``), printed again."""
        summary = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        console.info(format_summary(summary))
        return summary


def _take_remote_rows(layer: torch.nn.Module) -> int:
    """Rows an expert-parallel dispatcher sent to other ranks since the last call (0 for local dispatch)."""
    dispatcher = layer.dispatcher
    rows = int(getattr(dispatcher, "rows_sent_remote", 0))
    if hasattr(dispatcher, "reset_traffic"):
        dispatcher.reset_traffic()
    return rows


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen end-of-run report."""
    lines = [
        "",
        "=" * 72,
        f"run {s.get('run_dir', '')}: {s.get('steps')} steps, {s.get('tokens_seen', 0):,} tokens",
    ]
    if s.get("params_total"):
        lines.append(
            f"parameters      {s['params_total'] / 1e6:.2f}M total, {s['params_active'] / 1e6:.2f}M active per token"
        )
    if s.get("val_loss") is not None and s.get("unigram_entropy") is not None:
        lines.append(
            f"validation loss {s['val_loss']:.4f} nats (ppl {math.exp(min(s['val_loss'], 50)):.1f}); "
            f"unigram entropy {s['unigram_entropy']:.4f}; {s['gap_below_unigram']:.2f} nats below it"
        )
    if s.get("train_seconds"):
        lines.append(
            f"throughput      {s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.1f} s of steps, "
            f"{s['model_tflops_per_s'] * 1e3:.1f} model GFLOP/s"
            + (
                f", MFU {s['mfu']:.1%}"
                if s.get("mfu") is not None
                else " (MFU: set EXPERTRAIN_PEAK_TFLOPS on CPU)"
            )
        )
    lines.extend(s.get("lines", []))
    if s.get("sample"):
        lines.append("sample:")
        lines.extend("  | " + line for line in s["sample"].splitlines()[:12])
    lines.append("=" * 72)
    return "\n".join(lines)
