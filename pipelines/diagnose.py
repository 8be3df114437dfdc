"""Stage ``diagnose``: what the teacher makes of one distilled set (``wmdd.protocol.diagnostics``).

    python -m pipelines.diagnose --dataset digits --method dm --ipc 1

Runs the profile's teacher once over the set's clean images and measures how many it
assigns to their own class, how confidently, and how many pixel values lie outside the
valid range. Writes ``results/<profile>/<method>/ipc<k>/diagnostics.json`` (declared as DVC
metrics) with the MLflow run id; the report shows these beside the accuracies. Seconds
per cell: it needs neither the training images nor a student.
"""

from __future__ import annotations

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from wmdd import paths
from wmdd.data.prepared import MANIFEST_FILE
from wmdd.models.teacher import load_teacher
from wmdd.protocol.diagnostics import set_diagnostics
from wmdd.synthetic_set import SET_FILE, SyntheticSet
from wmdd.tracking.runs import stage_run
from wmdd.utils import read_json, resolve_device, write_json


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__, method=True, ipc=True).parse_args(argv)
    params = load_checked(args.params)
    profile, bench = params.profile(args.dataset), params.benchmark
    device = resolve_device(bench.device)
    manifest_path = paths.data_dir(args.dataset) / MANIFEST_FILE
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found (run the prepare stage first)")
    manifest = read_json(manifest_path)
    synthetic = SyntheticSet.load(set_dir / SET_FILE)
    with stage_run(
        experiment=bench.experiment,
        stage="diagnose",
        run_name=f"diagnose/{args.dataset}/{args.method}/ipc{args.ipc}",
        tags=stage_tags(args, profile),
        params={},
        inputs=[manifest_path, set_dir, teacher_file],
        device=device,
    ) as mlflow:
        teacher = load_teacher(teacher_file, device=device)
        stats = set_diagnostics(
            teacher,
            synthetic.images,
            synthetic.labels,
            mean=manifest["mean"],
            std=manifest["std"],
            device=device,
        )
        mlflow.log_metrics(stats)
        write_json(
            paths.diagnostics_path(args.dataset, args.method, args.ipc),
            {**stats, "mlflow_run_id": mlflow.active_run().info.run_id},
        )


if __name__ == "__main__":
    run_main(main)
