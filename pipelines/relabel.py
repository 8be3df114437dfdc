"""Stage ``relabel``: soft labels for one distilled set, by the profile's protocol.

    python -m pipelines.relabel --dataset digits --method random --ipc 10

With the soft-label protocol in ``stored`` mode, writes
``labels/<profile>/<method>/ipc<k>/seed<s>.pt`` for every eval seed: the explicit index
order, crop boxes, flips, CutMix parameters and the teacher's logits of every epoch and
batch, which the evaluate stage replays exactly. In ``online`` mode (and for the
hard-label protocol) only ``labels.json`` is written: the views are drawn again from the
same seeds at training time and nothing else needs storing.
"""

from __future__ import annotations

import time

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from wmdd import paths
from wmdd.config import flatten
from wmdd.models.teacher import load_teacher
from wmdd.protocol.runner import stored_labels_path
from wmdd.protocol.soft import StoredLabels, protocol_hash, relabel_seed
from wmdd.synthetic_set import SET_FILE, SyntheticSet
from wmdd.tracking.runs import stage_run
from wmdd.utils import atomic_dir, peak_memory_mb, resolve_device, write_json


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__, method=True, ipc=True).parse_args(argv)
    params = load_checked(args.params)
    profile = params.profile(args.dataset)
    bench = params.benchmark
    device = resolve_device(bench.device)
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    synthetic = SyntheticSet.load(set_dir / SET_FILE)
    phash = protocol_hash(profile.protocol, eval_seeds=bench.eval_seeds, base_seed=bench.seed)
    soft = profile.protocol.soft if profile.protocol.kind == "soft" else None
    stored = soft is not None and soft.relabel_mode == "stored"
    tags = stage_tags(args, profile, protocol=profile.protocol.kind, protocol_hash=phash)
    with stage_run(
        experiment=bench.experiment,
        stage="relabel",
        run_name=f"relabel/{args.dataset}/{args.method}/ipc{args.ipc}",
        tags=tags,
        params=flatten(profile.protocol, "protocol."),
        inputs=[set_dir, teacher_file],
        device=device,
    ) as mlflow:
        start = time.perf_counter()
        nbytes = 0
        with atomic_dir(paths.labels_dir(args.dataset, args.method, args.ipc)) as tmp:
            if soft is not None and stored:
                teacher = load_teacher(teacher_file, device=device)
                images = synthetic.images.to(device)
                for s in bench.eval_seeds:
                    seed = relabel_seed(bench.seed, args.dataset, args.ipc, s)
                    labels = StoredLabels.compute(
                        teacher, images, soft, seed=seed, progress=not args.no_progress
                    )
                    labels.save(stored_labels_path(tmp, s))
                    nbytes += labels.nbytes()
            seconds = time.perf_counter() - start
            mlflow.log_metrics(
                {
                    "relabel_seconds": seconds,
                    "label_bytes": nbytes,
                    "peak_mem_mb": peak_memory_mb(device),
                }
            )
            write_json(
                tmp / "labels.json",
                {
                    **tags,
                    "stored": stored,
                    "eval_seeds": list(bench.eval_seeds),
                    "label_bytes": nbytes,
                    "relabel_seconds": seconds,
                    "mlflow_run_id": mlflow.active_run().info.run_id,
                },
            )


if __name__ == "__main__":
    run_main(main)
