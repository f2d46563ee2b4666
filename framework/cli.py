"""The ``expertrain`` command: train, plugins, data prepare, export, config reference."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from framework.train.launch import main as train_main

    argv = ["--config", args.config]
    for o in args.overrides:
        argv += ["--set", o]
    return train_main(argv)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from framework.config import load_raw, plugin_names
    from framework.hooks.listing import describe_plugins

    enabled = plugin_names(load_raw(args.config)) if args.config else []
    print(describe_plugins(enabled))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from framework.checkpoint.export import (
        ExportFormatUnavailable,
        ExportOutputError,
        export_hf,
        export_native,
        export_plugin_format,
    )

    if args.merge and args.format != "hf":
        print("expertrain: error: --merge applies to 'export hf' only", file=sys.stderr)
        return 2
    try:
        if args.format == "native":
            files = export_native(
                args.checkpoint, args.output, overwrite=args.overwrite, whole_model=args.whole_model
            )
        elif args.format == "hf":
            files = export_hf(
                args.checkpoint,
                args.output,
                merge=args.merge,
                max_shard_bytes=args.max_shard_bytes,
                overwrite=args.overwrite,
                whole_model=args.whole_model,
            )
        else:
            files = export_plugin_format(
                args.checkpoint,
                args.output,
                args.format,
                overwrite=args.overwrite,
                whole_model=args.whole_model,
            )
    except (ExportFormatUnavailable, ExportOutputError) as exc:
        print(f"expertrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {args.output}: {', '.join(files)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from framework.plan.command import run_plan

    return run_plan(args)


def _cmd_config_docs(args: argparse.Namespace) -> int:
    from framework.config.docs import render_config_reference

    text = render_config_reference()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from framework.train.cli_args import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="expertrain", description="Train Mixture-of-Experts language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_train_arguments(
        sub.add_parser("train", help="train from a YAML job file (same as python -m framework.train)")
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plugins", help="list installed plugins, their hooks, and which a config enables")
    p.add_argument("--config", help="job file whose 'plugins' list marks plugins as enabled")
    p.set_defaults(func=_cmd_plugins)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    from framework.data.prepare import add_prepare_arguments, run_prepare

    p = data.add_parser("prepare", help="tokenize text or JSONL into the indexed (.bin/.idx) format")
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)

    p = sub.add_parser("export", help="export a checkpoint")
    p.add_argument(
        "format",
        help="'native', 'hf' (a transformers folder), or a format a plugin of the checkpoint's job provides "
        "(e.g. 'peft', 'mola')",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder or run folder (its latest checkpoint)"
    )
    p.add_argument("--output", required=True, help="folder to write (empty or new, unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output: replace the files a previous export wrote there (its export.json "
        "lists them); other files are kept",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="hf only: fold mergeable adapters (LoRA, ...) into the base weights",
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=None,
        help="hf only: the largest safetensors file; more weights go to further shards (default 5 GB)",
    )
    p.add_argument(
        "--whole-model",
        action="store_true",
        help="rebuild the whole model in memory first (for a plugin whose export reads base weights it does not "
        "declare); by default only the tensors an export reads are loaded",
    )
    p.set_defaults(func=_cmd_export)

    from framework.inference.cli import add_generate_arguments, run_generate

    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache; greedy or sampling)")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)

    from framework.plan.command import add_plan_arguments

    p = add_plan_arguments(
        sub.add_parser("plan", help="per-rank memory of a job built on meta for --nproc ranks (no weights)")
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("config-docs", help="print the config reference (docs/config.md is generated by this)")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_config_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from framework.observe.console import quiet_dependencies

    quiet_dependencies()
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        from framework.train.launch import user_error_types

        if isinstance(exc, user_error_types()):
            print(f"expertrain: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
