"""From a command line to a finished run: config and plugins first (nothing started on a bad job), then the trainer.

The core sections are typed before torch is imported (:func:`read_job`): a mistyped key or value fails on every rank
in well under a second, not after the seconds torch and the process group take to load.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from framework.config import ConfigError, JobConfig, check_world, load_raw, plugin_names, resolve
from framework.observe import console
from framework.train.cli_args import train_parser

if TYPE_CHECKING:
    from framework.hooks import PluginManager


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input: one line, no traceback."""
    from framework.checkpoint import CheckpointFormatError, CheckpointSaveError, RunDirLocked
    from framework.comm import collectives as C
    from framework.data import DataError
    from framework.hooks import ComponentError, PluginError, PluginHookError
    from framework.train.trainer import CheckpointMismatch, TrainingDiverged

    return (
        ConfigError,
        CheckpointFormatError,
        CheckpointSaveError,
        RunDirLocked,
        C.RankFailure,
        FileNotFoundError,
        DataError,
        PluginError,
        PluginHookError,
        ComponentError,
        CheckpointMismatch,
        TrainingDiverged,
    )


def read_job(config_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The raw job (file, overrides, a Hugging Face checkpoint's model sections) with its core sections typed and
    checked; needs no torch. The sections of the plugins it names are typed by :func:`load_job`, once they load."""
    raw = _raw_job(config_path, overrides)
    plugin_sections = set(plugin_names(raw))
    resolve({k: v for k, v in raw.items() if k not in plugin_sections}, source=config_path)
    return raw


def _raw_job(config_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    from framework.interop.hf.job import apply_hf_init

    return apply_hf_init(load_raw(config_path, list(overrides)))


def load_job(
    config_path: str, overrides: Sequence[str], raw: dict[str, Any] | None = None, world: int | None = None
) -> tuple[JobConfig, PluginManager]:
    """Type the job file and overrides (or the ``raw`` job :func:`read_job` returned for them), load the plugins it
    names, and let them validate it for ``world`` ranks (default: the world size torchrun announced)."""
    from framework.hooks import PluginManager
    from framework.models import default_registry
    from framework.parallel.mesh import ParallelLayout
    from framework.parallel.setup import env_world_size

    raw = _raw_job(config_path, overrides) if raw is None else raw
    names = plugin_names(raw)
    pm = PluginManager(default_registry())
    pm.load(names)
    config = resolve(raw, pm.config_sections, source=config_path)
    world = env_world_size() if world is None else world
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    check_world(config, layout.dp)
    pm.hook.expertrain_validate_config(config=config, world_size=world)
    return config, pm


def train(config_path: str, overrides: Sequence[str], raw: dict[str, Any] | None = None) -> dict:
    import torch

    from framework.parallel import watchdog
    from framework.parallel.setup import init_distributed
    from framework.train.signals import watch_launcher
    from framework.train.trainer import Trainer

    config, pm = load_job(config_path, overrides, raw)
    watch_launcher(config.checkpoint.save_on_signals)  # a worker whose torchrun was killed stops, not runs on
    info = init_distributed(config.train.device, config.parallel.timeout_s, config.train.deterministic)
    watchdog.install(config.parallel.timeout_s, pm)  # names a rank that hangs
    torch.manual_seed(config.train.seed + info.rank)
    trainer = Trainer(config, pm, info)
    try:
        trainer.build()
        return trainer.run()
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    try:
        raw = read_job(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        console.print_error(str(exc))
        return 1
    from framework.parallel import watchdog
    from framework.parallel.setup import shutdown
    from framework.train.signals import EXIT_CODE, StopRequested

    console.quiet_dependencies()
    succeeded = False
    try:
        train(args.config, args.overrides, raw)
        succeeded = True
        return 0
    except StopRequested as stop:
        succeeded = True  # every rank stopped at the same step, after the same save
        console.info(f"expertrain: {stop}")
        return EXIT_CODE
    except KeyboardInterrupt:
        console.print_error("interrupted")
        return 130
    except Exception as exc:
        # A collective that timed out or lost a peer: one line naming the rank that stopped responding.
        hang = watchdog.explain(exc)
        if hang is not None:
            console.print_error(hang)
        elif isinstance(exc, user_error_types()):
            console.print_error(str(exc))
        else:
            traceback.print_exc()
        return 1
    finally:
        shutdown(clean=succeeded)
