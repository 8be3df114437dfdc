"""Stage ``diagnose``: what the teacher makes of one distilled set
(``wmdd.protocol.diagnostics``).

    python -m pipelines.diagnose --dataset digits --method dm --ipc 1

Runs the profile's teacher once over the set's clean images and measures how many it
assigns to their own class, how confidently, and how many pixel values lie outside the
valid range. Writes ``results/<profile>/<method>/ipc<k>/diagnostics.json`` (declared as DVC
metrics); the report shows these beside the accuracies. Seconds
per cell: it needs neither the training images nor a student.
"""

from __future__ import annotations

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.data.prepared import MANIFEST_FILE
from wmdd.models.teacher import load_teacher
from wmdd.protocol.diagnostics import set_diagnostics
from wmdd.synthetic_set import SET_FILE, SyntheticSet
from wmdd.utils import read_json, write_json


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("diagnose", __doc__, argv, method=True, ipc=True)
    args, device = stage.args, stage.device
    manifest_path = paths.data_dir(args.dataset) / MANIFEST_FILE
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found (run the prepare stage first)")
    manifest = read_json(manifest_path)
    synthetic = SyntheticSet.load(set_dir / SET_FILE)
    teacher = load_teacher(teacher_file, device=device)
    out = paths.diagnostics_path(args.dataset, args.method, args.ipc)
    inputs = [manifest_path, set_dir, teacher_file]
    with stage.tracked(params={}, inputs=inputs, outputs=[out]) as mlflow:
        stats = set_diagnostics(
            teacher, synthetic.images, synthetic.labels,
            mean=manifest["mean"], std=manifest["std"], device=device,
        )  # fmt: skip
        mlflow.log_metrics(stats)
        write_json(out, stats)


if __name__ == "__main__":
    run_main(main)
