"""The ``expertrain plan`` command: build the job on meta for ``--nproc`` ranks and print its per-rank memory."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from framework.plan.memory import MemoryPlan, parse_size


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``plan`` subcommand's options."""
    parser.add_argument(
        "--config", help="job file (as for expertrain train); its model may be model.init_from: hf:DIR"
    )
    parser.add_argument(
        "--hf-config",
        help="a Hugging Face config.json (or its folder) for the model; no weights are read",
    )
    parser.add_argument("--nproc", type=int, default=1, help="world size: ranks of the job (default 1)")
    parser.add_argument(
        "--gpu-memory",
        help="memory per rank to fit in, e.g. 80GB (GiB: 80GB = 80 GiB); implies --device cuda unless given",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="runtime overhead kind"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set parallel.ep=8",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def make_plan(
    nproc: int,
    config: str | None = None,
    hf_config: str | None = None,
    overrides: list[str] | None = None,
    device: str = "cpu",
    capacity_bytes: int | None = None,
) -> MemoryPlan:
    """Type the job for ``nproc`` ranks, build it on meta and estimate rank 0's memory."""
    from framework.config import ConfigError
    from framework.plan.build import build_on_meta, plan_job_config
    from framework.plan.memory import plan_memory

    if nproc < 1:
        raise ConfigError("--nproc", nproc, "expected at least 1 rank")
    job_config, pm, layout, accumulation, notes = plan_job_config(nproc, config, overrides or [], hf_config)
    job = build_on_meta(job_config, pm, layout, accumulation, notes)
    return plan_memory(job, device, capacity_bytes)


def run_plan(args: argparse.Namespace) -> int:
    """Entry point of ``expertrain plan``: the table (or ``--json``) on stdout, or one error line and exit code 1."""
    from framework.plan.build import PlanError

    try:
        capacity = parse_size(args.gpu_memory) if args.gpu_memory else None
        device = args.device if args.device != "auto" else ("cuda" if capacity is not None else "cpu")
        # Plugins report on stdout while they transform the model: keep stdout for the plan alone.
        with contextlib.redirect_stdout(sys.stderr):
            plan = make_plan(args.nproc, args.config, args.hf_config, args.overrides, device, capacity)
    except (PlanError, ValueError) as exc:
        if not isinstance(exc, PlanError) and "memory size" not in str(exc):
            raise  # other errors go to the command line's own handling (ConfigError is a ValueError too)
        print(f"expertrain: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format_table())
    return 0
