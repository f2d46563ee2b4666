"""The training job as a sequence: build in order (config → plugins → model → transforms → trainable set →
parallelize → optimizer), then the step loop with its hooks, evaluation, checkpoints and the end-of-run report.

Each concern lives in its own module and the trainer only calls them in order: the data (``datasets.py``), the
model assembly (``assembly.py``), checkpoint compatibility (``resume.py``) and state (``checkpointing.py``), one
micro-batch's forward and loss (``forward.py``), expert-routing bookkeeping
(:mod:`framework.models.moe.routing_state`), evaluation and sampling (``evaluation.py``) and the report
(``report.py``). Build order and why: ``docs/architecture.md``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from framework.checkpoint import CheckpointStore, RunLock, acquire_run_lock
from framework.comm import collectives as C
from framework.config import JobConfig, check_world
from framework.config.job import save_resolved
from framework.engines import Engine, NativeEngine
from framework.hooks import PluginManager
from framework.models.moe.routing_state import RoutingState
from framework.observe import console
from framework.observe.metrics import MetricsWriter
from framework.observe.mfu import peak_tflops
from framework.observe.progress import ProgressBar
from framework.parallel.mesh import ParallelLayout, build_meshes
from framework.parallel.setup import DistInfo, set_deterministic
from framework.train import report
from framework.train.checkpointing import TrainingCheckpoints
from framework.train.datasets import build_training_data
from framework.train.evaluation import Evaluator, exact_match
from framework.train.forward import LossForward
from framework.train.loss import count_loss_tokens
from framework.train.optim import build_optimizer, build_scheduler
from framework.train.resume import CheckpointMismatch, check_compatible
from framework.train.run_state import RunState, StepResult, TrainingDiverged, divergence
from framework.train.signals import StopRequested, StopSignals

__all__ = ["CheckpointMismatch", "RunState", "StepResult", "Trainer", "TrainingDiverged"]


class Trainer:
    """One training job on this rank. Construct, :meth:`build`, then :meth:`run`."""

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
        set_deterministic(cfg.train.deterministic, self.device)  # also without launch.train
        self.meshes = build_meshes(self.layout, self.device)
        self.dp_rank, self.dp_size = self.meshes.dp_rank_and_size()
        if self.layout.is_parallel:
            console.info(f"parallel layout: {self.layout.describe()} on {self.layout.world} ranks")
        C.run_on_rank0("creating the run folder", self._create_run_dir)
        self.resume_from = self._find_resume_point()
        self.data = build_training_data(cfg)
        self._build_model()
        resumed = self.resume_from is not None
        self.pm.hook.expertrain_after_parallelize(model=self.raw_model, config=cfg, resumed=resumed)
        if cfg.train.engine == "deepspeed" and self.meshes.ep is not None:
            from framework.engines.deepspeed_engine import expert_parallel_params, mark_expert_params

            mark_expert_params(expert_parallel_params(self.raw_model), self.layout.ep)
        plugin_groups = self.pm.param_groups(self.raw_model, cfg)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, plugin_groups, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.pm.hook.expertrain_after_optimizer(model=self.raw_model, optimizer=self.optimizer, config=cfg)
        self.engine = self._build_engine()
        self.model = self.engine.model
        self._build_step_parts()
        if resumed:
            C.run_agreed(
                "loading the checkpoint",
                lambda: self.checkpoints.load(self.resume_from, self.state, self.device, self.dist.rank),
            )
        self.train_stream = self.data.train_stream(
            cfg, self.dp_rank, self.dp_size, self.state.samples_consumed
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

    def _build_step_parts(self) -> None:
        """The concerns the loop calls: forward and loss, routing bookkeeping, evaluation, checkpoints."""
        cfg = self.config
        # The LM head runs only at labelled positions unless tensor parallelism shards its input or a plugin's
        # extra loss declares the ``logits`` argument (the hook option, docs/hooks.md).
        head_at_labels = self.layout.tp == 1 and not self.pm.hook_argument_takers(
            "expertrain_extra_losses", "logits"
        )
        self.forward = LossForward(self.model, self.device, cfg.train.dtype, head_at_labels)
        element_bytes = 2 if cfg.train.dtype == "bf16" else 4
        self.routing = RoutingState(self.raw_model, self.layout.ep, cfg.model.dim * element_bytes)
        dp = (self.dp_rank, self.dp_size)
        self.evaluator = Evaluator(self.forward, cfg, self.data, dp, self.layout.tp, self.routing.discard)
        self.checkpoints = TrainingCheckpoints(
            self.store, self.engine, self.scheduler, self.pm, self.raw_model, cfg, self.dist.world_size
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
        if latest is not None:
            check_compatible(self.store.read_meta(latest), latest, self.config)
        return latest

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

    def save_checkpoint(self) -> Path:
        """Save the training state of the current step (collective); returns the checkpoint's folder."""
        return self.checkpoints.save(self.state, self.device)

    # --- the step -------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        """One optimizer step: its micro-batches forward and backward, the engine's step, the routing update."""
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
            input_ids, labels, position_ids = self.forward.to_device(batch)
            with self.engine.micro_batch(i == len(micro_batches) - 1):
                with self.forward.autocast():
                    logits, lm_sum = self.forward(input_ids, labels, position_ids)
                    extra = self._extra_losses(input_ids, logits)
                zero = torch.zeros((), device=self.device)
                self.engine.backward(lm_sum * lm_scale + sum(extra.values(), zero) / self.accumulation)
            loss_sum += lm_sum.detach().double().cpu()
            for k, v in extra.items():
                aux_totals[k] = aux_totals.get(k, 0.0) + float(v.detach()) / self.accumulation
        self.engine.finish_gradients()
        self.pm.hook.expertrain_after_backward(step=step, model=self.raw_model, config=cfg)
        grad_norm = self.engine.step()  # clip, optimizer step, zero the gradients
        self.scheduler.step()
        self.routing.after_optimizer_step(self.device)  # expert counts over every rank, aux-free bias update
        self.pm.hook.expertrain_after_optimizer_step(
            step=step, model=self.raw_model, optimizer=self.optimizer, config=cfg
        )
        totals = C.all_reduce_sum(torch.tensor([float(loss_sum), *aux_totals.values()], dtype=torch.float64))
        loss = float(totals[0]) / self.layout.tp / max(global_tokens, 1)
        # Summed over every rank: data-parallel ranks hold different micro-batches (averaged), tensor-parallel
        # ranks shares of the same micro-batch's aux losses (summed).
        aux = {k: float(v) / self.dp_size for k, v in zip(aux_totals, totals[1:].tolist())}
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise divergence(loss, grad_norm, step, self.store.latest())
        return StepResult(loss, aux, grad_norm, global_tokens, time.perf_counter() - t0)

    def _extra_losses(self, input_ids: torch.Tensor, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = dict(self.raw_model.aux_losses())
        for name, value in self.pm.merge_extra_losses(self.raw_model, input_ids, logits, self.config).items():
            if name in losses:
                raise ValueError(
                    f"extra loss '{name}' is also a core MoE loss; a plugin must use another name"
                )
            losses[name] = value
        return losses

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
            if C.broadcast_object(
                (self.run_dir / report.SUMMARY_FILE).is_file()
            ):  # rank 0's view: ranks agree
                console.info(
                    f"run {self.run_dir} is already complete ({self.state.step}/{cfg.train.steps} steps)"
                )
                return report.previous_summary(self.run_dir)
            # Killed after its final checkpoint but before its report: evaluate the loaded model and report.
            console.info(
                f"run {self.run_dir} finished training ({self.state.step}/{cfg.train.steps} steps) but has no "
                "summary.json: evaluating the final checkpoint and writing the report"
            )
            return self._finish(self.evaluator.validation_loss(), 0.0, 0)
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
            lr = self.scheduler.get_last_lr()[0]
            record = report.step_record(
                step,
                result,
                lr,
                self.state.tokens_seen,
                self.flops_per_token,
                self.peak_tflops,
                self.dist.world_size,
            )
            if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last_val = self.evaluator.validation_loss()
                if last_val is not None:
                    record["val_loss"] = last_val
                    record["val_ppl"] = math.exp(min(last_val, 50.0))
                    bar.write(f"step {step}: val_loss {last_val:.4f} (ppl {record['val_ppl']:.1f})")
            if step % cfg.logging.log_every == 0 or "val_loss" in record or step == cfg.train.steps:
                record.update(self.routing.metrics())
                record.update(self.pm.merge_metrics(step, self.raw_model, cfg))
                metrics.write(record)
            bar.update(result.loss, record["tokens_per_s"])
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
        """The end-of-run report: baseline, sample, exact match, ``expertrain_train_end``, summary and plots."""
        cfg = self.config
        baseline = report.unigram_baseline(cfg, self.data.val_ds)
        tokens = cfg.train.sample_tokens
        sample = self.evaluator.sample_text(tokens=tokens) if tokens else ""
        summary = report.build_summary(
            cfg,
            steps=self.state.step,
            tokens_seen=self.state.tokens_seen,
            val_loss=val_loss,
            baseline=baseline,
            train_seconds=train_time,
            steps_run=steps_run,
            param_counts=self.param_counts,
            flops_per_token=self.flops_per_token,
            peak_tflops=self.peak_tflops,
            world_size=self.dist.world_size,
            sample=sample,
        )
        if cfg.sft.eval_exact_match:
            accuracy = C.run_on_rank0(
                "exact-match evaluation",
                lambda: exact_match(cfg, self.raw_model, self.store, self.run_dir, self.forward),
            )
            report.add_exact_match(summary, accuracy, cfg)
        self.pm.hook.expertrain_train_end(model=self.raw_model, summary=summary, config=cfg)
        report.write_report(summary, cfg, baseline)
        return summary
