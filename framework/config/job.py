"""Job files: YAML with one mapping per section, dotted ``--set`` overrides, and the resolved :class:`JobConfig`."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from framework.config.errors import ConfigError
from framework.config.schema import build_section
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

TOP_LEVEL_KEYS = ("plugins",)


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a number (YAML 1.1 wants ``1.0e-4``, which surprises everyone)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> object:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What YAML could not parse, with its line and column (1-based), e.g. ``line 4, column 6: expected ',' or ']',
    but got ':' (while parsing a flow sequence started at line 3, column 7)``."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return str(exc).splitlines()[0]
    mark = exc.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        text += f" ({exc.context} started at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
    return text


@dataclass
class JobConfig:
    """A validated job: the core sections, the enabled plugins and their sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plugins: list[str] = field(default_factory=list)
    plugin_sections: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __getattr__(self, name: str) -> Any:
        # Plugin sections read like core ones: ``config.lora.r``.
        sections = self.__dict__.get("plugin_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of every section, as saved in ``run.dir/config.yaml``."""
        out: dict[str, Any] = {"plugins": list(self.plugins)}
        for name in CORE_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for name, section in self.plugin_sections.items():
            out[name] = dataclasses.asdict(section)
        return out

    @property
    def name(self) -> str:
        return self.run.name or (Path(self.source).stem if self.source else "job")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], typed value). Values are YAML scalars or flow lists."""
    if "=" not in text:
        raise ConfigError(text, text, "expected --set section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key, raw, "expected --set section.key=value with a dotted key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(
            key, raw, f"could not parse the value ({problem}); lists are written [a, b, c]"
        ) from None
    return key.split("."), value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(path), value, f"'{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_job_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML job file into a mapping; a missing or malformed file is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", str(path), "expected an existing YAML job file (see examples/configs/)")
    try:
        data = yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("--config", str(path), f"expected valid YAML ({yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "expected a YAML mapping of sections")
    return data


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Job file plus overrides, before any typing (the plugin list is needed to know plugin sections)."""
    raw = read_job_file(path) if path else {}
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return raw


def plugin_names(raw: dict[str, Any]) -> list[str]:
    names = raw.get("plugins", []) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("plugins", names, "expected a list of plugin names, e.g. [lora]")
    if len(set(names)) != len(names):
        raise ConfigError("plugins", names, "expected each plugin named once")
    return list(names)


def resolve(
    raw: dict[str, Any], plugin_section_types: dict[str, type] | None = None, source: str = ""
) -> JobConfig:
    """Type and validate every section. ``plugin_section_types`` maps section names of loaded plugins to dataclasses."""
    plugin_section_types = plugin_section_types or {}
    names = plugin_names(raw)
    accepted = [*TOP_LEVEL_KEYS, *CORE_SECTIONS, *plugin_section_types]
    for key in raw:
        if key in CORE_SECTIONS or key in TOP_LEVEL_KEYS or key in plugin_section_types:
            continue
        raise ConfigError(
            key,
            raw[key],
            "unknown section; accepted: "
            + ", ".join(accepted)
            + " (a plugin's section is accepted once the plugin is listed in 'plugins')",
        )
    kwargs: dict[str, Any] = {n: build_section(cls, raw.get(n), n) for n, cls in CORE_SECTIONS.items()}
    sections = {n: build_section(cls, raw.get(n), n) for n, cls in plugin_section_types.items()}
    job = JobConfig(**kwargs, plugins=names, plugin_sections=sections, source=str(source))
    check_job(job)
    return job


def check_job(job: JobConfig) -> None:
    """Cross-section rules that do not depend on the world size."""
    check_engine(job)
    check_fsdp_options(job)
    if job.data.seq_len > job.model.max_seq_len:
        raise ConfigError(
            "data.seq_len", job.data.seq_len, f"expected at most model.max_seq_len={job.model.max_seq_len}"
        )
    if job.train.global_batch_size % job.train.micro_batch_size:
        raise ConfigError(
            "train.global_batch_size",
            job.train.global_batch_size,
            f"expected a multiple of train.micro_batch_size={job.train.micro_batch_size}",
        )


def check_engine(job: JobConfig) -> None:
    """What the chosen engine cannot run: one line naming the key (docs/parallelism.md, docs/deepspeed.md)."""
    par = job.parallel
    if (
        job.train.engine == "native"
        and par.data == "ddp"
        and (par.tp > 1 or par.ep > 1 or par.dp_replicate > 1)
    ):
        raise ConfigError(
            "parallel.data",
            par.data,
            "ddp supports pure data parallelism only; use parallel.data=fsdp with tp, ep or dp_replicate",
        )
    if job.train.engine != "deepspeed":
        return
    par, stage = job.parallel, job.deepspeed.zero_stage
    if par.tp > 1:
        raise ConfigError(
            "parallel.tp",
            par.tp,
            "expected 1 with train.engine=deepspeed (DeepSpeed runs data and expert parallelism here); "
            "use train.engine=native for tensor parallelism",
        )
    if par.dp_replicate > 1:
        raise ConfigError(
            "parallel.dp_replicate",
            par.dp_replicate,
            "expected 1 with train.engine=deepspeed (HSDP is a native FSDP2 layout)",
        )
    if par.ep > 1 and stage == 3:
        raise ConfigError(
            "deepspeed.zero_stage",
            stage,
            f"expected 0, 1 or 2 with parallel.ep={par.ep}: ZeRO-3 cannot partition expert-parallel weights "
            "(DeepSpeed refuses it too); use deepspeed.zero_stage=2, or parallel.ep=1 with ZeRO-3",
        )
    if stage == 3 and job.train.compile:
        raise ConfigError(
            "train.compile",
            True,
            "expected false with deepspeed.zero_stage=3 (its parameter-gathering module hooks are not "
            "supported under torch.compile here); use deepspeed.zero_stage 1 or 2 to compile",
        )


def check_fsdp_options(job: JobConfig) -> None:
    """``parallel.param_dtype`` / ``reduce_dtype`` / ``cpu_offload`` are FSDP2 policies: refused where FSDP2 does not
    shard (the DeepSpeed engine, DDP) and where offloading means nothing (a CPU job). docs/parallelism.md."""
    options = job.parallel.fsdp_options()
    if not options:
        return
    name, (value, default) = next(iter(options.items()))
    key, expected = f"parallel.{name}", f"expected {yaml_scalar(default)}"
    if job.train.engine == "deepspeed":
        raise ConfigError(
            key,
            value,
            f"{expected} with train.engine=deepspeed: an FSDP2 option (DeepSpeed keeps fp32 weights, gradients and "
            "reductions, bf16 compute is train.dtype=bf16; docs/deepspeed.md); or use train.engine=native",
        )
    if job.parallel.data == "ddp":
        raise ConfigError(
            key, value, f"{expected} with parallel.data=ddp: an FSDP2 option; or use parallel.data=fsdp"
        )
    if job.parallel.cpu_offload and job.train.device == "cpu":
        raise ConfigError(
            "parallel.cpu_offload",
            True,
            "expected false with train.device=cpu (weights and optimizer state are in host memory already); "
            "offloading is for train.device=cuda",
        )


def check_fsdp_ranks(job: JobConfig, dp_size: int) -> None:
    """The FSDP2 policies apply only where FSDP2 shards: on 2 or more data-parallel ranks (one rank is not wrapped)."""
    options = job.parallel.fsdp_options()
    if options and dp_size < 2:
        name, (value, default) = next(iter(options.items()))
        raise ConfigError(
            f"parallel.{name}",
            value,
            f"expected {yaml_scalar(default)} with {dp_size} data-parallel rank: an FSDP2 option, and FSDP2 does not "
            "shard one rank; use train.dtype=bf16 (autocast) for bf16 compute, or launch with more data-parallel ranks",
        )


def yaml_scalar(value: object) -> str:
    """``value`` as a user writes it in a job file (``false``, not ``False``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_world(job: JobConfig, dp_size: int) -> int:
    """Gradient-accumulation steps for ``dp_size`` data-parallel ranks, or a clear error if the layout cannot work."""
    check_fsdp_ranks(job, dp_size)
    per_step = dp_size * job.train.micro_batch_size
    if job.train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            job.train.global_batch_size,
            f"expected a multiple of data-parallel ranks ({dp_size}) x train.micro_batch_size "
            f"({job.train.micro_batch_size}) = {per_step}; change either, or launch with another --nproc_per_node",
        )
    return job.train.global_batch_size // per_step


def save_resolved(job: JobConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(job.to_dict(), sort_keys=False), encoding="utf-8")
