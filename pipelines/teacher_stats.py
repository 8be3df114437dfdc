"""Stage ``teacher_stats``: the teacher's features and per-class BN statistics of the real
training images, in one teacher pass per class (:mod:`wmdd.synthesis.teacher_stats`).

    python -m pipelines.teacher_stats --dataset digits

Outputs ``models/<profile>/teacher_stats.pt``, read by every IPC of WMDD and by herding
(their distill stages), so the real training set goes through the teacher once per teacher
instead of twice per WMDD cell and once more for herding. Its batch size is
``teacher_stats.batch_size`` in ``params.yaml``.
"""

from __future__ import annotations

import time

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.synthesis.teacher_stats import compute_teacher_stats
from wmdd.utils import atomic_file, file_digest, peak_memory_mb


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("teacher_stats", __doc__, argv)
    dataset, device = stage.args.dataset, stage.device
    batch_size = stage.params.teacher_stats.batch_size
    data_dir, teacher_file = paths.data_dir(dataset), paths.teacher_path(dataset)
    data = load_data(data_dir, stage.profile.data)
    teacher = load_teacher(teacher_file, device=device)
    inputs = [data_dir, teacher_file]
    out = paths.teacher_stats_path(dataset)
    with stage.tracked(params={"batch_size": batch_size}, inputs=inputs, outputs=[out]) as mlflow:
        start = time.perf_counter()
        stats = compute_teacher_stats(
            teacher, data, range(data.num_classes), batch_size=batch_size, device=device,
            teacher_digest=file_digest(teacher_file), progress=stage.progress,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        with atomic_file(out) as tmp:
            stats.save(tmp)
        images = sum(len(f) for f in stats.features)
        mlflow.log_metrics({
            "seconds": seconds, "images": images, "images_per_second": images / max(seconds, 1e-9),
            "peak_mem_mb": peak_memory_mb(device), "size_mb": out.stat().st_size / 2**20,
        })  # fmt: skip


if __name__ == "__main__":
    run_main(main)
