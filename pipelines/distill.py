"""Stage ``distill``: run one method for one (dataset profile, IPC).

    python -m pipelines.distill --dataset digits --method random --ipc 10
    python -m pipelines.distill --dataset digits --method random --ipc 10 --classes 0:5

Outputs ``distilled/<profile>/<method>/ipc<k>/``: ``set.pt`` (normalised images, labels,
optional weights), ``preview.png`` and ``meta.json`` (cell, config, seed). ``--classes a:b``
distils a *shard* (kept in the stage's checkpoint directory; no output); the run over all
classes merges shards that tile them (``python -m pipelines.parallel --shards K``).
"""

from __future__ import annotations

from pipelines.common import open_stage, run_main
from pipelines.registry import resolve_method
from wmdd import paths
from wmdd.config import flatten, to_dict
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.synthetic_set import distill_classes, parse_class_range, save_distilled
from wmdd.utils import derive_seed


def main(argv: list[str] | None = None) -> None:
    stage = open_stage(
        "distill", __doc__, argv, method=True, ipc=True,
        add_arguments=lambda p: p.add_argument("--classes", help="class range a:b (a shard)"),
    )  # fmt: skip
    args, device = stage.args, stage.device
    spec, config = resolve_method(stage.params, args.method, args.dataset)
    data = load_data(paths.data_dir(args.dataset), stage.profile.data)
    classes = parse_class_range(args.classes, data.num_classes)
    teacher_file = paths.teacher_path(args.dataset)
    teacher = load_teacher(teacher_file, device=device) if spec.needs_teacher else None
    seed = derive_seed(stage.bench.seed, args.dataset, args.method)
    inputs = [paths.data_dir(args.dataset)] + ([teacher_file] if teacher is not None else [])
    method_inputs = {}
    if spec.uses_teacher_stats:  # imported here: a method without it never loads the module
        from wmdd.synthesis.teacher_stats import load_teacher_stats

        stats_file = paths.teacher_stats_path(args.dataset)
        method_inputs["teacher_stats"] = load_teacher_stats(stats_file, teacher_file)
        inputs.append(stats_file)
    run_params = {**flatten(config, "method."), "seed": seed, "ipc": args.ipc}
    resume = stage.checkpoints(params=(run_params, stage.tags()), inputs=inputs)
    shard = len(classes) < data.num_classes  # a part of the cell: no output
    tags = stage.tags(classes=f"{classes.start}:{classes.stop}", **{"shard": True} if shard else {})
    out = paths.distilled_dir(args.dataset, args.method, args.ipc)
    with stage.tracked(
        params=run_params, inputs=inputs, outputs=[] if shard else [out], **tags
    ) as mlflow:
        synthetic, metrics = distill_classes(
            spec.fn, classes=classes, num_classes=data.num_classes, ipc=args.ipc, resume=resume,
            method=args.method, teacher=teacher, data=data, config=config, seed=seed,
            device=device, progress=stage.progress, **method_inputs,
        )  # fmt: skip
        mlflow.log_metrics(metrics)
        if synthetic is None:
            return
        # meta.json: what defines the set, no run metadata (same inputs, same bytes)
        meta = {**tags, "config": to_dict(config), "seed": seed, "images": len(synthetic.labels)}
        mlflow.log_artifact(str(save_distilled(out, synthetic, data, meta=meta)))
    resume.clear()


if __name__ == "__main__":
    run_main(main)
