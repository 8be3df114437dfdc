"""Command ``sensitivity``: the protocol-sensitivity panel (README "Protocol sensitivity").

    python -m pipelines.sensitivity --dataset imagenette_cpu --ipc 10 \\
        --methods random wmdd rded --sets 0 1 --jobs 2

How far the soft-label protocol's own knobs move each method's score, and whether they change
the ranking, on distilled sets the pipeline has already made
(``distilled/<profile>/<method>/ipc<k>/set<s>``). Every set is evaluated with every eval
seed under each combination of

* the student batch size (``--batch-sizes``; default 16 and the profile's own), and
* the schedule (``--schedules``): ``full`` is the protocol's cosine to 0 over the epochs,
  ``half`` the first half of a cosine twice as long (the learning rate ends at lr / 2, what
  a schedule set for twice the epochs gives),

validating every ``--eval-interval`` epochs so that the best epoch's top-1 can stand beside
the final one: in this panel only, never in the main table. Everything else is the profile's
soft protocol with its seeds; the labels are drawn online by the teacher from the same seeds
as the ``relabel`` stage's (online = stored, bit for bit), so the profile's batch size with
the full cosine reproduces the ``evaluate`` stage's number for that set and seed.

Writes ``--out`` (default ``reports/<profile>/sensitivity.csv``): one row per method, set,
eval seed, batch size and schedule, appended as each student finishes, so an interrupted
panel resumes where it stopped (a CSV from other settings is refused). ``python -m
pipelines.report --out reports/<profile>`` renders it as the report's panel. Not a DVC stage:
it is a study run on demand (each student is a full protocol run: about 4-6 minutes at
``imagenette_cpu`` on one core); ``--jobs N`` trains N students at once, one process each
with ``benchmark.threads`` threads. Logged to MLflow as one ``sensitivity`` run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipelines.common import configure_process, open_stage, run_main
from wmdd import paths
from wmdd.config import ConfigError, SoftProtocolConfig, load_params
from wmdd.data import load_data
from wmdd.models.accuracy import split_validator
from wmdd.models.teacher import load_teacher
from wmdd.protocol.plan import ProtocolPlan, protocol_hash, protocol_plan
from wmdd.protocol.runner import evaluate_seed
from wmdd.synthetic_set import SET_FILE, SyntheticSet

SCHEDULES = ("full", "half")
COLUMNS = [
    "profile", "method", "ipc", "set", "eval_seed", "batch_size", "schedule",
    "final_top1", "best_top1", "best_epoch", "epochs", "eval_interval", "protocol_hash",
    "variant_hash", "seconds",
]  # fmt: skip
KEY = ("method", "set", "eval_seed", "batch_size", "schedule")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", required=True, help="methods (keys of methods)")
    parser.add_argument(
        "--sets", nargs="+", type=int, help="distilled sets of each cell (default: all made)"
    )
    parser.add_argument(
        "--eval-seeds", nargs="+", type=int, help="eval seeds (default: benchmark.eval_seeds)"
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int,
        help="student batch sizes (default: 16 and the profile's)",
    )  # fmt: skip
    parser.add_argument(
        "--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
        help="full: cosine to 0; half: the first half of a cosine twice as long",
    )  # fmt: skip
    parser.add_argument(
        "--eval-interval", type=int, default=50,
        help="validate every this many epochs, for the best epoch (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once")
    parser.add_argument("--out", help="CSV (default: reports/<profile>/sensitivity.csv)")


def variant(
    soft: SoftProtocolConfig, *, batch_size: int, schedule: str, eval_interval: int
) -> SoftProtocolConfig:
    """The profile's soft protocol with one panel setting: the batch size, the schedule
    (``half``: ``schedule_epochs = 2 * epochs``), validation every ``eval_interval`` epochs
    and online labels (the same views and logits as stored ones)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {SCHEDULES}")
    return dataclasses.replace(
        soft,
        batch_size=batch_size,
        schedule_epochs=2 * soft.epochs if schedule == "half" else 0,
        eval_interval=eval_interval,
        relabel_mode="online",
    )


def variant_plan(plan: ProtocolPlan, settings: SoftProtocolConfig, protocol, bench) -> ProtocolPlan:
    """``plan`` with the variant's settings and their own hash (the validation interval and
    the relabel mode do not change a student, so they are left out of it)."""
    hashed = dataclasses.replace(
        settings, eval_interval=plan.soft.eval_interval, relabel_mode=plan.soft.relabel_mode
    )
    proto = dataclasses.replace(protocol, soft=hashed)
    digest = protocol_hash(proto, eval_seeds=bench.eval_seeds, base_seed=bench.seed, kind="soft")
    return dataclasses.replace(plan, settings=settings, hash=digest)


# -- worker processes ---------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(params_file: str, dataset: str, device: str) -> None:
    """Loads the params, the prepared data, the teacher and the validator once per process."""
    params = load_params(params_file)
    configure_process(params.benchmark)
    dev = torch.device(device)
    data = load_data(paths.data_dir(dataset), params.profile(dataset).data)
    _WORKER.update(
        params=params,
        data=data,
        device=dev,
        teacher=load_teacher(paths.teacher_path(dataset), device=dev),
        validate=split_validator(data, device=dev),
    )


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Trains one student of the panel; returns its CSV row."""
    w = _WORKER
    params, dataset, ipc = w["params"], task["profile"], task["ipc"]
    bench, protocol = params.benchmark, params.profile(dataset).protocol
    plan = protocol_plan(
        protocol, profile=dataset, ipc=ipc, eval_seeds=bench.eval_seeds,
        base_seed=bench.seed, kind="soft",
    )  # fmt: skip
    settings = variant(
        plan.soft, batch_size=task["batch_size"], schedule=task["schedule"],
        eval_interval=task["eval_interval"],
    )  # fmt: skip
    vplan = variant_plan(plan, settings, protocol, bench)
    seed = next(s for s in plan.seeds if s.eval_seed == task["eval_seed"])
    cell_dir = paths.distilled_dir(dataset, task["method"], ipc)
    synthetic = SyntheticSet.load(paths.set_dir(cell_dir, task["set"]) / SET_FILE)
    start = time.perf_counter()
    result = evaluate_seed(
        vplan, seed, data=w["data"], synthetic=synthetic, teacher=w["teacher"],
        labels_dir=Path(), device=w["device"], validate=w["validate"], progress=False,
    )  # fmt: skip
    return {
        **{k: task[k] for k in ("profile", "method", "ipc", "set", "eval_seed")},
        "batch_size": task["batch_size"],
        "schedule": task["schedule"],
        "final_top1": result["top1"],
        "best_top1": result["best_top1"],
        "best_epoch": result["best_epoch"],
        "epochs": settings.epochs,
        "eval_interval": settings.eval_interval,
        "protocol_hash": plan.hash,
        "variant_hash": vplan.hash,
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- the panel's CSV ----------------------------------------------------------------------


def _row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in KEY)


def read_done(out: Path, *, protocol_hash: str, eval_interval: int) -> dict[tuple, dict]:
    """The rows an earlier run of the same panel wrote to ``out`` (none if it is absent);
    refuses a CSV of another protocol or validation interval, naming the file."""
    if not out.exists():
        return {}
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ConfigError(
                f"{out}: not a sensitivity panel CSV (expected the columns {COLUMNS}, found "
                f"{reader.fieldnames}); move it away or pass another --out"
            )
        rows = list(reader)
    for row in rows:
        if row["protocol_hash"] != protocol_hash or int(row["eval_interval"]) != eval_interval:
            raise ConfigError(
                f"{out}: written under protocol hash {row['protocol_hash']} with "
                f"--eval-interval {row['eval_interval']}, this panel is {protocol_hash} with "
                f"{eval_interval}; move the file away or pass another --out"
            )
    return {_row_key(r): r for r in rows}


def _append(out: Path, row: dict[str, Any]) -> None:
    """Appends one finished student's row (the header first on a new file); a line is
    written whole, so an interruption leaves every earlier row readable."""
    new = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()


def tasks(
    *, profile: str, ipc: int, methods, sets: dict[str, list[int]], eval_seeds, batch_sizes,
    schedules, eval_interval: int,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The panel's students, set by set (every method and variant of set 0 first), so a
    panel stopped early is balanced across methods."""
    depth = max(len(s) for s in sets.values())
    for i, e, b, sch, m in itertools.product(
        range(depth), eval_seeds, batch_sizes, schedules, methods
    ):
        if i < len(sets[m]):
            yield {
                "profile": profile, "ipc": ipc, "method": m, "set": sets[m][i],
                "eval_seed": e, "batch_size": b, "schedule": sch,
                "eval_interval": eval_interval,
            }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("sensitivity", __doc__, argv, ipc=True, add_arguments=_arguments)
    args, bench = stage.args, stage.bench
    protocol = stage.profile.protocol
    unknown = [m for m in args.methods if m not in stage.params.methods]
    if unknown:
        raise ConfigError(f"--methods: {unknown} not keys of methods in {args.params}")
    if args.jobs < 1 or args.eval_interval < 1:
        raise ConfigError("--jobs and --eval-interval: expected integers >= 1")
    soft = protocol.soft
    if soft is None:
        raise ConfigError(f"datasets.{args.dataset}.protocol.soft: the panel needs it")
    batch_sizes = args.batch_sizes or sorted({16, soft.batch_size})
    eval_seeds = args.eval_seeds or list(bench.eval_seeds)
    bad_seeds = [e for e in eval_seeds if e not in bench.eval_seeds]
    if bad_seeds:
        raise ConfigError(f"--eval-seeds {bad_seeds}: not in benchmark.eval_seeds")
    sets: dict[str, list[int]] = {}
    for m in args.methods:
        cell_dir = paths.distilled_dir(args.dataset, m, args.ipc)
        made = paths.set_indices(cell_dir) if cell_dir.is_dir() else []
        wanted = args.sets if args.sets is not None else made
        missing = [s for s in wanted if s not in made]
        if not made or missing:
            raise ConfigError(
                f"{cell_dir}: distilled sets {missing or wanted} not found (made: {made}); "
                f"run `python -m pipelines.distill --dataset {args.dataset} --method {m} "
                f"--ipc {args.ipc}` first"
            )
        sets[m] = [s for s in made if s in wanted]
    teacher_file = paths.teacher_path(args.dataset)
    if not teacher_file.exists():
        raise ConfigError(f"{teacher_file}: no teacher (the panel relabels online with it)")
    for b in batch_sizes:
        if b < 1:
            raise ConfigError(f"--batch-sizes: expected integers >= 1, got {b}")
    plan = protocol_plan(
        protocol, profile=args.dataset, ipc=args.ipc, eval_seeds=bench.eval_seeds,
        base_seed=bench.seed, kind="soft",
    )  # fmt: skip
    out = Path(args.out) if args.out else paths.REPORTS / args.dataset / "sensitivity.csv"
    done = read_done(out, protocol_hash=plan.hash, eval_interval=args.eval_interval)
    todo = [
        t
        for t in tasks(
            profile=args.dataset,
            ipc=args.ipc,
            methods=args.methods,
            sets=sets,
            eval_seeds=eval_seeds,
            batch_sizes=batch_sizes,
            schedules=args.schedules,
            eval_interval=args.eval_interval,
        )  # fmt: skip
        if _row_key(t) not in done
    ]
    params = {
        "ipc": args.ipc, "methods": args.methods, "sets": sets, "eval_seeds": eval_seeds,
        "batch_sizes": batch_sizes, "schedules": args.schedules,
        "eval_interval": args.eval_interval, "jobs": args.jobs, **plan.mlflow_params(),
    }  # fmt: skip
    inputs = [paths.data_dir(args.dataset), teacher_file] + [
        paths.distilled_dir(args.dataset, m, args.ipc) for m in args.methods
    ]
    with stage.tracked(params=params, inputs=inputs, outputs=[]) as mlflow:
        bar = tqdm(total=len(todo), desc="sensitivity", unit="student", disable=not stage.progress)
        init = (args.params, args.dataset, str(stage.device))
        if args.jobs == 1:
            _init_worker(*init)
            for task in todo:
                _record(mlflow, out, _run_task(task), bar)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, context, _init_worker, init) as pool:
                pending: set[Future] = {pool.submit(_run_task, t) for t in todo}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        _record(mlflow, out, future.result(), bar)
        bar.close()
        mlflow.log_artifact(str(out))


def _record(mlflow, out: Path, row: dict[str, Any], bar: tqdm) -> None:
    """One finished student: its CSV row, its MLflow metrics, the progress bar."""
    _append(out, row)
    name = "{method}.set{set}.seed{eval_seed}.b{batch_size}.{schedule}".format(**row)
    mlflow.log_metrics(
        {f"{name}.final_top1": row["final_top1"], f"{name}.best_top1": row["best_top1"]}
    )
    bar.update(1)
    bar.set_postfix_str(f"{name} {row['final_top1']:.1f}")


if __name__ == "__main__":
    run_main(main)
