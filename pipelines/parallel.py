"""Run the DVC pipeline with independent stages at once, on a Dask cluster (``wmdd.scale``).

    python -m pipelines.parallel                       # a local cluster: cores / threads workers
    python -m pipelines.parallel --workers 2           # two worker processes
    python -m pipelines.parallel --shards 4            # + each distillation as 4 class ranges
    python -m pipelines.parallel --seed-tasks          # + each evaluation as one task per seed
    python -m pipelines.parallel --scheduler-file /shared/scheduler.json   # an existing cluster
    python -m pipelines.parallel --address tcp://10.0.0.1:8786 'evaluate@*'  # targets, as dvc

``dvc repro`` stays the plain, sequential way; this runs the same DVC graph (DVC decides
what changed, DVC's run cache restores what ran before, ``dvc.lock`` is written as ``dvc
repro`` writes it) with every ready stage submitted to a worker. With ``--seed-tasks`` an
evaluation runs as one task per eval seed, with ``--shards`` a distillation as class
ranges, then the stage assembles them: worth it when a stage takes minutes, since each task
costs a process start (README "Scaling out" has the measured speed-ups). Each stage process
uses ``benchmark.threads`` torch threads, so results are byte-identical to a sequential run
with the same setting. Needs ``pip install -e '.[cluster]'``. Exits 1 naming the stages
that failed (their logs: ``logs/parallel/``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipelines.common import setup_logging
from pipelines.registry import shard_ranges
from wmdd.config import ConfigError, load_params
from wmdd.scale.runner import (
    EngineMissingError,
    PipelineRunner,
    Task,
    require_dask,
    stage_command,
)

log = logging.getLogger("pipelines.parallel")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="DVC stages or groups (default: all)")
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--workers", type=int, default=0, help="local workers (0: cores / threads)")
    parser.add_argument("--shards", type=int, default=1, help="class ranges per distillation")
    parser.add_argument(
        "--seed-tasks", action="store_true", help="evaluations as one task per eval seed"
    )
    parser.add_argument("--address", help="scheduler address of an existing Dask cluster")
    parser.add_argument("--scheduler-file", help="scheduler file of an existing Dask cluster")
    parser.add_argument("--gpus-per-task", type=int, default=0, choices=(0, 1))
    parser.add_argument("--force", action="store_true", help="run every stage (dvc repro -f)")
    return parser.parse_args(argv)


def splitter(args: argparse.Namespace, eval_seeds: tuple[int, ...], gpu: bool):
    """Sub-tasks of a stage: distillations by class range (every set of the cell per task),
    evaluations by eval seed (every set of the cell per task)."""

    def split(stage) -> list[Task]:
        name, _, cell = stage.addressing.partition("@")
        cmd = stage_command(stage)
        if name in ("evaluate", "evaluate_hard") and args.seed_tasks and len(eval_seeds) > 1:
            return [Task(stage.addressing, f"{stage.addressing} seed {s}", f"{cmd} --seed {s}", gpu)
                    for s in eval_seeds]  # fmt: skip
        if name == "distill" and args.shards > 1:
            ranges = shard_ranges(args.params, cmd, args.shards)
            if len(ranges) < 2:  # the method's batches span every class: nothing to split
                return []
            return [Task(stage.addressing, f"{stage.addressing} classes {r.start}:{r.stop}",
                         f"{cmd} --classes {r.start}:{r.stop}", gpu) for r in ranges]  # fmt: skip
        return []

    return split


def connect(args: argparse.Namespace, threads: int):
    distributed = require_dask()
    if args.scheduler_file or args.address:
        return distributed.Client(address=args.address, scheduler_file=args.scheduler_file)
    workers = args.workers or max(1, (os.cpu_count() or 1) // max(threads, 1))
    resources = {"GPU": 1} if args.gpus_per_task else None
    cluster = distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, resources=resources,
    )  # fmt: skip
    log.info("local Dask cluster: %d workers x %d torch thread(s)", workers, threads)
    return distributed.Client(cluster)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bench = load_params(args.params).benchmark
    threads = bench.threads or (os.cpu_count() or 1)
    client = connect(args, threads)
    try:
        runner = PipelineRunner(
            Path.cwd(), client, split=splitter(args, bench.eval_seeds, bool(args.gpus_per_task)),
            gpu=bool(args.gpus_per_task), threads_env={"OMP_NUM_THREADS": str(threads)},
            force=args.force,
        )  # fmt: skip
        outcome = runner.run(args.targets or None)
    finally:
        client.close()
    log.info(
        "ran %d, restored %d, unchanged %d, failed %d, blocked %d",
        len(outcome.ran), len(outcome.restored), len(outcome.skipped), len(outcome.failed),
        len(outcome.blocked),
    )  # fmt: skip
    for stage, error in outcome.failed.items():
        log.error("stage %s failed: %s", stage, error.splitlines()[0])
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    setup_logging()
    try:
        sys.exit(main())
    except (EngineMissingError, ConfigError, FileNotFoundError) as err:
        logging.getLogger("pipelines.parallel").error("%s", err)
        sys.exit(2)
