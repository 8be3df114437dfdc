"""Stage ``diagnose``: what the teacher makes of a cell's distilled sets
(``wmdd.protocol.diagnostics``).

    python -m pipelines.diagnose --dataset digits --method dm --ipc 1

Runs the profile's teacher once over each set's clean images and measures how many it
assigns to their own class, how confidently, and how many pixel values lie outside the
valid range; for a set with barycenter targets (WMDD), also whether the teacher recognises
the targets themselves and how far the images' features ended from them. Writes
``results/<profile>/<method>/ipc<k>/diagnostics.json`` (declared as DVC metrics): the mean
over the cell's sets of each number, and every set's under ``per_set``; the report shows
them beside the accuracies. Seconds per cell: it needs neither the training images nor a
student.
"""

from __future__ import annotations

import statistics

import torch

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.data.prepared import MANIFEST_FILE
from wmdd.models.teacher import load_teacher
from wmdd.protocol.diagnostics import barycenter_diagnostics, set_diagnostics
from wmdd.synthetic_set import AUX_FILE, SET_FILE, SyntheticSet
from wmdd.utils import load_artifact, read_json, write_json


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("diagnose", __doc__, argv, method=True, ipc=True)
    args, device = stage.args, stage.device
    manifest_path = paths.data_dir(args.dataset) / MANIFEST_FILE
    cell_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found (run the prepare stage first)")
    manifest = read_json(manifest_path)
    sets = paths.set_indices(cell_dir)
    teacher = load_teacher(teacher_file, device=device)
    out = paths.diagnostics_path(args.dataset, args.method, args.ipc)
    inputs = [manifest_path, cell_dir, teacher_file]
    with stage.tracked(params={}, inputs=inputs, outputs=[out]) as mlflow:
        per_set = {}
        for s in sets:
            folder = paths.set_dir(cell_dir, s)
            synthetic = SyntheticSet.load(folder / SET_FILE)
            stats = set_diagnostics(
                teacher, synthetic.images, synthetic.labels,
                mean=manifest["mean"], std=manifest["std"], device=device,
            )  # fmt: skip
            if (folder / AUX_FILE).is_file():
                aux = load_artifact(folder / AUX_FILE, "aux file", stage="distill")
                if isinstance(aux.get("barycenters"), torch.Tensor):
                    stats |= barycenter_diagnostics(
                        teacher, synthetic.images, synthetic.labels, aux["barycenters"],
                        aux["classes"], device=device,
                    )  # fmt: skip
            per_set[str(s)] = stats
            mlflow.log_metrics({f"set{s}.{k}": v for k, v in stats.items()})
        keys = next(iter(per_set.values()))
        mean = {k: statistics.fmean(v[k] for v in per_set.values()) for k in keys}
        mean["pixel_min"] = min(v["pixel_min"] for v in per_set.values())
        mean["pixel_max"] = max(v["pixel_max"] for v in per_set.values())
        mlflow.log_metrics(mean)
        write_json(out, {**mean, "sets": len(sets), "per_set": per_set})


if __name__ == "__main__":
    run_main(main)
