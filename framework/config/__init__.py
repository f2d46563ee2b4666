"""Typed job configuration: sections, YAML job files, ``--set`` overrides, clear errors."""

from framework.config.errors import ConfigError
from framework.config.job import JobConfig, check_world, load_raw, parse_override, plugin_names, resolve
from framework.config.schema import build_section, option, section_docs
from framework.config.sections import (
    CORE_SECTIONS,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SFTDataConfig,
    TrainConfig,
)

__all__ = [
    "CORE_SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SFTDataConfig",
    "TrainConfig",
    "build_section",
    "check_world",
    "load_raw",
    "option",
    "parse_override",
    "plugin_names",
    "resolve",
    "section_docs",
]
