"""Stage ``prepare``: read a dataset profile's source and write its prepared form.

    python -m pipelines.prepare --dataset digits

Outputs ``data/<profile>/{data.pt,manifest.json}`` (written to a temporary directory and
moved into place only when complete).
"""

from __future__ import annotations

import time

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from wmdd import paths
from wmdd.config import flatten
from wmdd.data.prepare import prepare_dataset
from wmdd.tracking.runs import stage_run
from wmdd.utils import atomic_dir, resolve_device


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__).parse_args(argv)
    params = load_checked(args.params)
    profile = params.profile(args.dataset)
    device = resolve_device("cpu")
    out = paths.data_dir(args.dataset)
    with stage_run(
        experiment=params.benchmark.experiment,
        stage="prepare",
        run_name=f"prepare/{args.dataset}",
        tags=stage_tags(args, profile),
        params=flatten(profile.data, "data."),
        inputs=[],
        device=device,
    ) as mlflow:
        start = time.perf_counter()
        with atomic_dir(out) as tmp:
            manifest = prepare_dataset(profile.data, tmp, progress=not args.no_progress)
        counts = manifest["counts"]
        mlflow.log_metrics(
            {
                "train_images": counts["train"],
                "val_images": counts["val"],
                "classes": len(manifest["classes"]),
                "skipped_images": manifest["skipped"]["count"],
                "seconds": time.perf_counter() - start,
            }
        )
        mlflow.log_dict(manifest, "manifest.json")


if __name__ == "__main__":
    run_main(main)
