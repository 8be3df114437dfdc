"""Shared wiring for stage entry points: arguments, logging, params, device, MLflow run.

Every stage script reads the same way::

    stage = open_stage("evaluate", __doc__, argv, method=True, ipc=True)
    ...                                  # load inputs (errors here open no MLflow run)
    with stage.tracked(params=..., inputs=[...]) as run:
        ...                              # the work; run.log_metrics(...), run.run_id
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from wmdd import paths
from wmdd.checkpoint import StageCheckpoints
from wmdd.config import BenchmarkConfig, ConfigError, Params, ProfileConfig, load_params
from wmdd.distributed import Ranks, init_ranks, ranks_from_env
from wmdd.tracking import lifecycle
from wmdd.tracking.runs import log_dataset, stage_run
from wmdd.tracking.store import TrackingError
from wmdd.utils import resolve_device, set_allocator, set_channels_last, set_threads


class StageArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2): the usage block is for ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def ipc_value(text: str) -> int:
    """``--ipc``: a positive integer, as in ``benchmark.ipcs``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, as in params.yaml's benchmark.ipcs, got {text!r}"
        )
    return value


def base_parser(
    description: str, *, dataset: bool = True, method: bool = False, ipc: bool = False
) -> argparse.ArgumentParser:
    """The arguments every stage shares; stage-specific ones are added by the caller."""
    parser = StageArgumentParser(
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
        parser.add_argument("--ipc", required=True, type=ipc_value, help="images per class")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return parser


@dataclass(frozen=True)
class Stage:
    """One stage invocation: its arguments, the loaded params and the device."""

    name: str  # the DVC stage's name (``distill``), also the MLflow ``stage`` tag
    args: argparse.Namespace  # the parsed command line
    params: Params  # params.yaml, validated
    device: torch.device  # where the stage computes
    ranks: Ranks | None = None  # data-parallel ranks under torchrun (evaluate only)

    @property
    def main(self) -> bool:
        """Whether this process logs and writes outputs (rank 0, or the only process)."""
        return self.ranks is None or self.ranks.main

    @property
    def bench(self) -> BenchmarkConfig:
        return self.params.benchmark

    @property
    def profile(self) -> ProfileConfig:
        return self.params.profile(self.args.dataset)

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def cell(self) -> list[str]:
        """The stage's coordinates: profile, method, ``ipc<k>`` (those it takes)."""
        keys = [getattr(self.args, k, None) for k in ("dataset", "method")]
        ipc = getattr(self.args, "ipc", None)
        return [str(k) for k in keys if k is not None] + ([f"ipc{ipc}"] if ipc else [])

    def tags(self, **extra: Any) -> dict[str, Any]:
        """The MLflow tags that identify the run: profile, budget, dataset, and for per-cell
        stages the method and IPC (plus ``extra``)."""
        tags: dict[str, Any] = {}
        if getattr(self.args, "dataset", None):
            profile = self.profile
            tags = {"dataset": self.args.dataset, "budget": profile.budget}
            tags["dataset_name"] = profile.data.name
        for key in ("method", "ipc"):
            if hasattr(self.args, key):
                tags[key] = getattr(self.args, key)
        return {**tags, **extra}

    @contextlib.contextmanager
    def tracked(
        self,
        *,
        params: dict[str, Any],
        inputs: list[Path],
        outputs: list[Path] | None = None,
        **tags: Any,
    ) -> Iterator[Any]:
        """The stage's MLflow run, named ``<stage>/<profile>/<method>/ipc<k>``; yields the
        ``mlflow`` module with the run active. ``inputs`` and ``outputs`` (files or
        folders) are tagged with their MD5s: how the report finds the run behind an
        output. Start it after the inputs are loaded and checked, so bad input opens no
        run. Data-parallel ranks other than 0 get a stand-in that logs nothing."""
        if not self.main:
            yield NullRun()
            return
        cell = {k: v for k, v in self.tags().items() if k in CELL_PARAMS}
        with stage_run(
            experiment=self.bench.experiment,
            stage=self.name,
            run_name="/".join([self.name, *self.cell]),
            tags=self.tags(**tags),
            params={**cell, **params},  # the cell as params too: the compare view plots them
            inputs=inputs,
            outputs=outputs,
            device=self.device,
        ) as mlflow:
            if getattr(self.args, "dataset", None):
                log_dataset(mlflow, paths.data_dir(self.args.dataset), self.name)
            yield mlflow

    def checkpoints(
        self, *, params: Any, inputs: list[Path], part: str | None = None
    ) -> StageCheckpoints:
        """This execution's checkpoint directory, keyed by ``params``, the input files
        and the code (``runtime.checkpoint_seconds`` sets the interval); ``part`` (e.g.
        ``set1``) gives a part of the cell its own directory."""
        return StageCheckpoints.for_stage(
            self.name,
            self.cell + ([part] if part else []),
            params=params,
            inputs=inputs,
            every_seconds=self.params.runtime.checkpoint_seconds,
        )


CELL_PARAMS = ("dataset", "method", "ipc", "budget")  # logged as params on every run


class NullRun:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def configure_process(benchmark: BenchmarkConfig) -> None:
    """The process-wide settings every stage process (and worker) starts with: torch and
    BLAS threads, the models' memory format, the allocator policy (``WMDD_MALLOC``)."""
    set_threads(benchmark.threads)
    set_channels_last(benchmark.channels_last)
    set_allocator()


def open_stage(
    name: str,
    doc: str | None,
    argv: list[str] | None,
    *,
    dataset: bool = True,
    method: bool = False,
    ipc: bool = False,
    device: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], Any] | None = None,
    data_parallel: bool = False,
) -> Stage:
    """Parses the stage's arguments, loads params and resolves the device (``device`` fixes
    it, e.g. ``"cpu"`` for prepare; else ``benchmark.device``). Under ``torchrun`` a
    ``data_parallel`` stage joins the process group; any other stage refuses to start."""
    parser = base_parser(doc or name, dataset=dataset, method=method, ipc=ipc)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if dataset:
        params.profile(args.dataset)  # an unknown profile fails here, naming the known ones
    if method and args.method not in params.methods:
        raise ConfigError(
            f"--method {args.method!r}: not a key of params.yaml's methods "
            f"(known: {', '.join(sorted(params.methods))})"
        )
    configure_process(params.benchmark)
    ranks = ranks_from_env()
    if ranks is not None and not data_parallel:
        raise ConfigError(f"stage {name!r} does not run data-parallel: start it without torchrun")
    stage = Stage(name, args, params, resolve_device(device or params.benchmark.device), ranks)
    init_ranks(ranks, stage.device)
    return stage


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Runs a stage's ``main`` as a command: it dies with its parent (a killed ``dvc``
    leaves no stage behind), SIGTERM / Ctrl-C end it cleanly (exit 143 / 130, the MLflow run
    KILLED, no partial output), and configuration, input and tracking errors exit with code
    2 and one clear line instead of a traceback."""
    setup_logging()
    logger = logging.getLogger("pipelines")
    try:
        lifecycle.install_signal_handlers()
        lifecycle.die_with_parent()
        main(argv)
    except (lifecycle.StageInterrupted, KeyboardInterrupt) as err:
        logger.error("interrupted (%s): nothing was written", err or "SIGINT")
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)
    except (ConfigError, FileNotFoundError, ValueError, TrackingError) as err:
        if os.environ.get("WMDD_TRACEBACK"):
            raise
        logger.error("%s (set WMDD_TRACEBACK=1 for a traceback)", err)
        sys.exit(2)
