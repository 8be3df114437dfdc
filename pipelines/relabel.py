"""Stage ``relabel``: soft labels for a cell's distilled sets, by the soft-label protocol.

    python -m pipelines.relabel --dataset digits --method random --ipc 10

In ``stored`` mode, writes ``labels/<profile>/<method>/ipc<k>/set<s>/seed<e>.pt`` for every
distilled set s and eval seed e: the explicit index order, crop boxes, flips, CutMix
parameters and the teacher's logits of every epoch and batch, which the evaluate stage
replays exactly (the views depend on the eval seed only, so every set, and every method, is
seen through the same views). In ``online`` mode only ``labels.json`` is written: the views
are drawn again from the same seeds at training time and nothing else needs storing (nor
the teacher loading). The hard-label protocol needs no relabelling.
"""

from __future__ import annotations

import time

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.models.teacher import load_teacher
from wmdd.protocol.plan import protocol_plan
from wmdd.protocol.runner import store_labels
from wmdd.synthetic_set import SET_FILE, SyntheticSet
from wmdd.utils import atomic_dir, peak_memory_mb, write_json


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("relabel", __doc__, argv, method=True, ipc=True)
    args, bench, device = stage.args, stage.bench, stage.device
    cell_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    sets = paths.set_indices(cell_dir)
    plan = protocol_plan(
        stage.profile.protocol, profile=args.dataset, ipc=args.ipc,
        eval_seeds=bench.eval_seeds, base_seed=bench.seed, kind="soft",
    )  # fmt: skip
    teacher = load_teacher(teacher_file, device=device) if plan.relabel_needs_teacher else None
    tags = stage.tags(protocol=plan.kind, protocol_hash=plan.hash)
    inputs = [cell_dir] + ([teacher_file] if teacher is not None else [])
    out = paths.labels_dir(args.dataset, args.method, args.ipc)
    with stage.tracked(params=plan.mlflow_params(), inputs=inputs, outputs=[out], **tags) as mlflow:
        start, nbytes = time.perf_counter(), 0
        with atomic_dir(out) as tmp:
            for s in sets if plan.relabel_needs_teacher else []:
                assert teacher is not None
                set_file = paths.set_dir(cell_dir, s) / SET_FILE
                images = SyntheticSet.load(set_file).images.to(device)
                nbytes += store_labels(
                    teacher, images, plan, paths.set_dir(tmp, s), progress=stage.progress
                )
            info = {"stored": plan.stores_labels, "eval_seeds": list(bench.eval_seeds),
                    "sets": sets}  # fmt: skip
            per_set = nbytes // len(sets)  # every set of a cell has the same size
            write_json(tmp / paths.LABELS_FILE, {**tags, **info, "label_bytes": per_set})
        seconds = time.perf_counter() - start
        # The cost of one set (what storing and relabelling one distilled dataset costs).
        cost = {"relabel_seconds": seconds / len(sets), "label_bytes": per_set,
                "relabel_seconds_total": seconds, "label_bytes_total": nbytes}  # fmt: skip
        mlflow.log_metrics({**cost, "peak_mem_mb": peak_memory_mb(device)})


if __name__ == "__main__":
    run_main(main)
