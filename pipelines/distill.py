"""Stage ``distill``: run one method for one (dataset profile, IPC).

    python -m pipelines.distill --dataset digits --method random --ipc 10
    python -m pipelines.distill --dataset digits --method random --ipc 10 --classes 0:5

Outputs ``distilled/<profile>/<method>/ipc<k>/``: ``set.pt`` (images in normalised space,
labels, optional weights), ``preview.png`` (a grid, one row per class) and ``meta.json``
(the cell, method config and seed; wall time and memory are MLflow metrics). ``--classes a:b``
distils only classes ``a..b-1`` (for sharding; the result equals that slice of a full run).
"""

from __future__ import annotations

from pipelines.common import open_stage, run_main
from pipelines.registry import get_method, method_config, validate_method
from wmdd import paths
from wmdd.config import flatten, to_dict
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.synthetic_set import parse_class_range, run_method, save_distilled
from wmdd.utils import derive_seed


def main(argv: list[str] | None = None) -> None:
    stage = open_stage(
        "distill", __doc__, argv, method=True, ipc=True,
        add_arguments=lambda p: p.add_argument("--classes", help="class range a:b (default: all)"),
    )  # fmt: skip
    args, device = stage.args, stage.device
    validate_method(stage.params, args.method)  # every profile's override parses
    spec, config = get_method(args.method), method_config(stage.params, args.method, args.dataset)
    data = load_data(paths.data_dir(args.dataset), stage.profile.data)
    classes = parse_class_range(args.classes, data.num_classes)
    teacher_file = paths.teacher_path(args.dataset)
    teacher = load_teacher(teacher_file, device=device) if spec.needs_teacher else None
    seed = derive_seed(stage.bench.seed, args.dataset, args.method)
    inputs = [paths.data_dir(args.dataset)] + ([teacher_file] if teacher is not None else [])
    tags = stage.tags(classes=f"{classes.start}:{classes.stop}")
    run_params = {**flatten(config, "method."), "seed": seed, "ipc": args.ipc}
    out = paths.distilled_dir(args.dataset, args.method, args.ipc)
    resume = stage.checkpoints(params=(run_params, tags), inputs=inputs)
    with stage.tracked(params=run_params, inputs=inputs, outputs=[out], **tags) as mlflow:
        synthetic, metrics = run_method(
            spec.fn, teacher=teacher, data=data, classes=classes, ipc=args.ipc, config=config,
            seed=seed, device=device, progress=stage.progress,
            checkpoint=resume.loop("synthesis", f"distill {args.method}"),
        )  # fmt: skip
        # meta.json holds what defines the set, never run metadata (times, memory, run id):
        # a re-run with the same inputs writes the same bytes.
        meta = {**tags, "config": to_dict(config), "seed": seed, "images": metrics["images"]}
        preview = save_distilled(out, synthetic, data, meta=meta)
        mlflow.log_artifact(str(preview))
        mlflow.log_metrics(metrics)
    resume.clear()


if __name__ == "__main__":
    run_main(main)
