"""Stage ``prepare``: read a dataset profile's source and write its prepared form.

    python -m pipelines.prepare --dataset digits

Outputs ``data/<profile>/{data.pt,manifest.json}`` (written to a temporary directory and
moved into place only when complete).
"""

from __future__ import annotations

import time

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.config import flatten
from wmdd.data.prepare import prepare_dataset
from wmdd.utils import atomic_dir


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("prepare", __doc__, argv, device="cpu")
    data_cfg = stage.profile.data
    out = paths.data_dir(stage.args.dataset)
    with stage.tracked(params=flatten(data_cfg, "data."), inputs=[], outputs=[out]) as mlflow:
        start = time.perf_counter()
        with atomic_dir(out) as tmp:
            manifest = prepare_dataset(data_cfg, tmp, progress=stage.progress)
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
