"""Shared wiring for stage entry points: arguments, logging, params, device, run names."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from wmdd.config import ConfigError, Params, ProfileConfig, load_params


def base_parser(
    description: str, *, dataset: bool = True, method: bool = False, ipc: bool = False
) -> argparse.ArgumentParser:
    """The arguments every stage shares; stage-specific ones are added by the caller."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", default="params.yaml", help="parameter file (default: %(default)s)"
    )
    if dataset:
        parser.add_argument(
            "--dataset", required=True, help="dataset profile (a key of `datasets`)"
        )
    if method:
        parser.add_argument("--method", required=True, help="method (a key of `methods`)")
    if ipc:
        parser.add_argument("--ipc", required=True, type=int, help="images per class")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return parser


def stage_tags(args: argparse.Namespace, profile: ProfileConfig, **extra) -> dict:
    """The MLflow tags that identify a stage run: profile, budget, dataset, and for per-cell
    stages the method and IPC (plus ``extra``)."""
    tags = {"dataset": args.dataset, "budget": profile.budget, "dataset_name": profile.data.name}
    for key in ("method", "ipc"):
        if hasattr(args, key):
            tags[key] = getattr(args, key)
    return {**tags, **extra}


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def load_checked(path: str) -> Params:
    """Loads params and validates every method section (fails before any work is done)."""
    from pipelines.registry import validate_methods

    params = load_params(path)
    validate_methods(params)
    return params


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Runs a stage's ``main``; configuration and input errors exit with code 2 and one
    clear line instead of a traceback."""
    setup_logging()
    try:
        main(argv)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if os.environ.get("WMDD_TRACEBACK"):
            raise
        logging.getLogger("pipelines").error("%s (set WMDD_TRACEBACK=1 for a traceback)", err)
        sys.exit(2)
