"""Command-line arguments shared by ``python -m framework.train`` and ``expertrain train``."""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML job file (see examples/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable); lists as [a, b]",
    )
    return parser


def train_parser() -> argparse.ArgumentParser:
    return add_train_arguments(
        argparse.ArgumentParser(
            prog="python -m framework.train", description="Train a model from a YAML job file."
        )
    )
