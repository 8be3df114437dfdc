"""Stage ``evaluate`` / ``evaluate_hard``: train students on a cell's distilled sets by the
soft-label (``--protocol soft``, stage ``evaluate``) or the hard-label protocol (stage
``evaluate_hard``).

    python -m pipelines.evaluate --dataset digits --method random --ipc 10
    python -m pipelines.evaluate --dataset digits --method random --ipc 10 --protocol hard
    torchrun --nproc_per_node 4 -m pipelines.evaluate ...      # one student on 4 ranks

One student per (distilled set, eval seed), validated on the full validation split; writes
``results/<profile>/<method>/ipc<k>/<protocol>/metrics.json``: per set and seed the final /
best top-1 and top-5; the mean, the sample std at the level of the distilled set (over the
per-set means; over eval seeds when the cell has one set), its n; the protocol hash.
``--seed e`` trains eval seed e of every set as a part of the cell (kept for the cell's run;
no output).
"""

from __future__ import annotations

import argparse
import functools

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.protocol.plan import protocol_plan
from wmdd.protocol.runner import evaluate_seeds, log_seed, log_summary, write_results
from wmdd.synthetic_set import SET_FILE, SyntheticSet


def _arguments(parser) -> None:
    parser.add_argument("--seed", type=int, help="one eval seed of every set (a part)")
    parser.add_argument(
        "--protocol", choices=paths.PROTOCOLS, default="soft", help="protocol (default: soft)"
    )


def main(argv: list[str] | None = None) -> None:
    args_protocol = _peek_protocol(argv)
    stage = open_stage(
        "evaluate" if args_protocol == "soft" else "evaluate_hard", __doc__, argv, method=True,
        ipc=True, add_arguments=_arguments, data_parallel=True,
    )  # fmt: skip
    args, bench, device = stage.args, stage.bench, stage.device
    data_dir, teacher_file = paths.data_dir(args.dataset), paths.teacher_path(args.dataset)
    cell_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    labels_dir = paths.labels_dir(args.dataset, args.method, args.ipc)
    data = load_data(data_dir, stage.profile.data)
    sets = paths.set_indices(cell_dir)
    synthetic = {s: SyntheticSet.load(paths.set_dir(cell_dir, s) / SET_FILE) for s in sets}
    plan = protocol_plan(
        stage.profile.protocol, profile=args.dataset, ipc=args.ipc, kind=args.protocol,
        eval_seeds=bench.eval_seeds, base_seed=bench.seed, only=args.seed,
    )  # fmt: skip
    teacher = load_teacher(teacher_file, device=device) if plan.evaluate_needs_teacher else None
    inputs = [data_dir, cell_dir] + ([labels_dir] if plan.kind == "soft" else [])
    inputs += [teacher_file] if teacher is not None else []
    part = args.seed is not None  # one seed of the cell: kept for the full run, no output
    out, curve = (
        f(args.dataset, args.method, args.ipc, plan.kind)
        for f in (paths.results_path, paths.curve_path)
    )
    tags: dict = {"protocol": plan.kind, "protocol_hash": plan.hash, "eval_seed": args.seed}
    with stage.tracked(params={**plan.mlflow_params(), "sets": sets}, inputs=inputs,
                       outputs=[] if part else [out, curve], shard=part, **tags) as mlflow:  # fmt: skip
        per_set = {}
        resumes = {
            s: stage.checkpoints(params=plan.hash, inputs=inputs, part=f"set{s}") for s in sets
        }
        for s, resume in resumes.items():
            per_set[s] = evaluate_seeds(
                plan, data=data, synthetic=synthetic[s], teacher=teacher,
                labels_dir=paths.set_dir(labels_dir, s), device=device, resume=resume,
                on_seed=functools.partial(_log_seed, mlflow, s),
                progress=stage.progress, ranks=stage.ranks,
            )  # fmt: skip
        if not stage.main:  # the other data-parallel ranks trained; rank 0 records
            return
        summary = log_summary(mlflow, per_set, device=device)
        if not part:
            write_results(per_set, summary, protocol_hash=plan.hash, record=out, curve=curve)
            for resume in resumes.values():
                resume.clear()


def _log_seed(mlflow, set_index: int, eval_seed: int, result: dict) -> None:
    log_seed(mlflow, eval_seed, result, set_index=set_index)


def _peek_protocol(argv: list[str] | None) -> str:
    """The ``--protocol`` value before the full parse (it names the stage); the full parser
    checks it."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--protocol", default="soft")
    return peek.parse_known_args(argv)[0].protocol


if __name__ == "__main__":
    run_main(main)
