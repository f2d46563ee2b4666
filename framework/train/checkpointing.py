"""What a training checkpoint holds and how it goes back in: model, optimizer, scheduler, plugin state, the run's
position and the RNG. Both engines give the model and optimizer state in one parameter-name keyed format, so a run
resumes under either engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from framework.checkpoint import CheckpointStore
from framework.config import JobConfig
from framework.engines import Engine
from framework.hooks import PluginManager
from framework.observe import console
from framework.train.optim import apply_group_settings, group_settings, load_scheduler_state, optim_changes
from framework.train.resume import check_tensor_shapes
from framework.train.run_state import RunState


class TrainingCheckpoints:
    """Saves the training state into the run's checkpoint store and loads it back (collective, every rank)."""

    def __init__(
        self,
        store: CheckpointStore,
        engine: Engine,
        scheduler: Any,
        plugins: PluginManager,
        raw_model: torch.nn.Module,
        config: JobConfig,
        world_size: int,
    ) -> None:
        self.store = store
        self.engine = engine
        self.scheduler = scheduler
        self.pm = plugins
        self.raw_model = raw_model
        self.config = config
        self.world_size = world_size

    def _state(self, targets: bool = False) -> dict[str, Any]:
        """What a checkpoint holds (``targets``: tensors of the right shapes to load into)."""
        model_sd, optim_sd = self.engine.state_targets() if targets else self.engine.state_dicts()
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "plugins": self.pm.plugin_state_dicts(self.raw_model, self.config),
        }

    def save(self, run: RunState, device: torch.device) -> Path:
        """Write a checkpoint of step ``run.step``; returns its folder."""
        meta = {
            "samples_consumed": run.samples_consumed,
            "tokens_seen": run.tokens_seen,
            "world_size": self.world_size,
            "engine": self.engine.name,
            "config": self.config.to_dict(),
        }
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return self.store.save(run.step, self._state(), meta, rng)

    def load(self, path: Path, run: RunState, device: torch.device, rank: int) -> None:
        """Load the checkpoint at ``path`` into the model, optimizer, scheduler, plugins, ``run`` and the RNG; every
        model tensor's shape is checked first. The job's ``optim`` section wins over the checkpoint's."""
        target = self._state(targets=True)
        meta = self.store.read_meta(path)
        saved_config = meta.get("config", {})
        check_tensor_shapes(path, target["model"], saved_config, self.config)
        state, meta, rng = self.store.load(path, target)
        job_settings = group_settings(self.scheduler.optimizer)
        self.engine.load_state_dicts(state["model"], state["optim"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        apply_group_settings(self.scheduler, job_settings)  # the job's optim section wins, never a mix
        saved_steps = int(saved_config.get("train", {}).get("steps", self.config.train.steps))
        steps = (saved_steps, self.config.train.steps)
        for line in optim_changes(saved_config.get("optim", {}), self.config.optim, int(meta["step"]), steps):
            console.info(line)
        self.pm.load_plugin_state_dicts(state.get("plugins", {}), self.raw_model, self.config)
        run.step = int(meta["step"])
        run.samples_consumed = int(meta["samples_consumed"])
        run.tokens_seen = int(meta.get("tokens_seen", 0))
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        else:
            console.warn(
                f"no saved RNG state for rank {rank} (world size changed); dropout noise will differ", True
            )
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        console.info(f"resumed from {path} at step {run.step}")
