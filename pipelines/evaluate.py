"""Stage ``evaluate``: train students on one distilled set by the profile's protocol.

    python -m pipelines.evaluate --dataset digits --method random --ipc 10
    torchrun --nproc_per_node 4 -m pipelines.evaluate ...      # one student on 4 ranks

One student per eval seed, validated on the full validation split; writes ``results/.../
metrics.json``: per seed final / best top-1, top-5; mean, sample std, n; protocol hash.
``--seed s`` trains one seed as a part of the cell (kept for the cell's run; no output).
"""

from __future__ import annotations

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.protocol.plan import protocol_plan
from wmdd.protocol.runner import evaluate_seeds, log_seed, log_summary, write_results
from wmdd.synthetic_set import SET_FILE, SyntheticSet


def main(argv: list[str] | None = None) -> None:
    stage = open_stage(
        "evaluate", __doc__, argv, method=True, ipc=True,
        add_arguments=lambda p: p.add_argument("--seed", type=int, help="one eval seed (a part)"),
        data_parallel=True,
    )  # fmt: skip
    args, bench, device = stage.args, stage.bench, stage.device
    data_dir, teacher_file = paths.data_dir(args.dataset), paths.teacher_path(args.dataset)
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    labels_dir = paths.labels_dir(args.dataset, args.method, args.ipc)
    data = load_data(data_dir, stage.profile.data)
    synthetic = SyntheticSet.load(set_dir / SET_FILE)
    plan = protocol_plan(
        stage.profile.protocol, profile=args.dataset, ipc=args.ipc,
        eval_seeds=bench.eval_seeds, base_seed=bench.seed, only=args.seed,
    )  # fmt: skip
    teacher = load_teacher(teacher_file, device=device) if plan.evaluate_needs_teacher else None
    inputs = [data_dir, set_dir, labels_dir] + ([teacher_file] if teacher is not None else [])
    resume = stage.checkpoints(params=plan.hash, inputs=inputs)
    part = args.seed is not None  # one seed of the cell: kept for the full run, no output
    out, curve = (
        f(args.dataset, args.method, args.ipc) for f in (paths.results_path, paths.curve_path)
    )
    tags: dict = {"protocol": plan.kind, "protocol_hash": plan.hash, "eval_seed": args.seed}
    with stage.tracked(params=plan.mlflow_params(), inputs=inputs, outputs=[] if part else [out, curve],
                       shard=part, **tags) as mlflow:  # fmt: skip
        per_seed = evaluate_seeds(
            plan, data=data, synthetic=synthetic, teacher=teacher, labels_dir=labels_dir,
            device=device, resume=resume, on_seed=lambda s, r: log_seed(mlflow, s, r),
            progress=stage.progress, ranks=stage.ranks,
        )  # fmt: skip
        if not stage.main:  # the other data-parallel ranks trained; rank 0 records
            return
        summary = log_summary(mlflow, per_seed, device=device)
        if not part:
            write_results(per_seed, summary, protocol_hash=plan.hash, record=out, curve=curve)
            resume.clear()


if __name__ == "__main__":
    run_main(main)
