"""Stage ``relabel``: soft labels for one distilled set, by the profile's protocol.

    python -m pipelines.relabel --dataset digits --method random --ipc 10

With the soft-label protocol in ``stored`` mode, writes
``labels/<profile>/<method>/ipc<k>/seed<s>.pt`` for every eval seed: the explicit index
order, crop boxes, flips, CutMix parameters and the teacher's logits of every epoch and
batch, which the evaluate stage replays exactly. In ``online`` mode (and for the
hard-label protocol) only ``labels.json`` is written: the views are drawn again from the
same seeds at training time and nothing else needs storing (nor the teacher loading).
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
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    images = SyntheticSet.load(set_dir / SET_FILE).images.to(device)
    plan = protocol_plan(
        stage.profile.protocol, profile=args.dataset, ipc=args.ipc,
        eval_seeds=bench.eval_seeds, base_seed=bench.seed,
    )  # fmt: skip
    teacher = load_teacher(teacher_file, device=device) if plan.relabel_needs_teacher else None
    tags = stage.tags(protocol=plan.kind, protocol_hash=plan.hash)
    inputs = [set_dir] + ([teacher_file] if teacher is not None else [])
    out = paths.labels_dir(args.dataset, args.method, args.ipc)
    with stage.tracked(params=plan.mlflow_params(), inputs=inputs, outputs=[out], **tags) as mlflow:
        start, nbytes = time.perf_counter(), 0
        with atomic_dir(out) as tmp:
            if teacher is not None:
                nbytes = store_labels(teacher, images, plan, tmp, progress=stage.progress)
            info = {"stored": plan.stores_labels, "eval_seeds": list(bench.eval_seeds)}
            write_json(tmp / paths.LABELS_FILE, {**tags, **info, "label_bytes": nbytes})
        cost = {"relabel_seconds": time.perf_counter() - start, "label_bytes": nbytes}
        mlflow.log_metrics({**cost, "peak_mem_mb": peak_memory_mb(device)})


if __name__ == "__main__":
    run_main(main)
