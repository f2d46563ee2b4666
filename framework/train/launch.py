"""From a command line to a finished run: config and plugins first (nothing started on a bad job), then the trainer."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import torch

from framework.checkpoint import CheckpointFormatError
from framework.config import ConfigError, JobConfig, check_world, load_raw, plugin_names, resolve
from framework.hooks import PluginManager
from framework.models import default_registry
from framework.observe import console
from framework.parallel import collectives as C
from framework.parallel import watchdog
from framework.parallel.mesh import ParallelLayout
from framework.parallel.setup import env_world_size, init_distributed, shutdown
from framework.train.cli_args import train_parser

# Errors that describe the user's input: one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointFormatError,
    C.RankFailure,
    FileNotFoundError,
)


def user_error_types() -> tuple[type[BaseException], ...]:
    from framework.data import DataError
    from framework.hooks import ComponentError, PluginError, PluginHookError
    from framework.train.trainer import CheckpointMismatch, TrainingDiverged

    return (
        *USER_ERRORS,
        DataError,
        PluginError,
        PluginHookError,
        ComponentError,
        CheckpointMismatch,
        TrainingDiverged,
    )


def load_job(config_path: str, overrides: Sequence[str]) -> tuple[JobConfig, PluginManager]:
    """Type the job file and overrides, load the plugins it names, and let them validate it."""
    from framework.interop.hf.job import apply_hf_init

    raw = apply_hf_init(load_raw(config_path, list(overrides)))
    names = plugin_names(raw)
    pm = PluginManager(default_registry())
    pm.load(names)
    config = resolve(raw, pm.config_sections, source=config_path)
    world = env_world_size()
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    check_world(config, layout.dp)
    pm.hook.expertrain_validate_config(config=config, world_size=world)
    return config, pm


def train(config_path: str, overrides: Sequence[str]) -> dict:
    from framework.train.trainer import Trainer

    config, pm = load_job(config_path, overrides)
    info = init_distributed(config.train.device, config.parallel.timeout_s)
    watchdog.install(config.parallel.timeout_s, pm)  # names a rank that hangs
    torch.manual_seed(config.train.seed + info.rank)
    trainer = Trainer(config, pm, info)
    trainer.build()
    return trainer.run()


def main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    console.quiet_dependencies()
    succeeded = False
    try:
        train(args.config, args.overrides)
        succeeded = True
        return 0
    except KeyboardInterrupt:
        print(console.error_line("interrupted"), file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        # A collective that timed out or lost a peer: one line naming the rank that stopped responding.
        hang = watchdog.explain(exc)
        if hang is not None:
            print(console.error_line(hang), file=sys.stderr, flush=True)
        elif isinstance(exc, user_error_types()):
            print(console.error_line(str(exc)), file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        return 1
    finally:
        shutdown(clean=succeeded)
