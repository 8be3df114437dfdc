"""Stage ``teacher``: train the dataset profile's teacher, or load pretrained weights
(``teacher.pretrained``, e.g. torchvision's ResNet-18 IMAGENET1K_V1 for ImageNet-1K).

    python -m pipelines.teacher --dataset digits

Outputs ``models/<profile>/teacher.pt`` (weights + the config to rebuild them strictly)
and ``models/<profile>/metrics.json`` (validation top-1/top-5; wall time in MLflow).
"""

from __future__ import annotations

import time

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.config import flatten
from wmdd.data import load_data
from wmdd.models.accuracy import split_validator
from wmdd.models.teacher import check_teacher_source, obtain_teacher, save_teacher
from wmdd.utils import atomic_file, derive_seed, peak_memory_mb, write_csv, write_json


def main(argv: list[str] | None = None) -> None:
    stage = open_stage("teacher", __doc__, argv)
    profile, dataset, device = stage.profile, stage.args.dataset, stage.device
    data_dir = paths.data_dir(dataset)
    data = load_data(data_dir, profile.data)
    check_teacher_source(profile.teacher, data, dataset)
    seed = derive_seed(stage.bench.seed, dataset, "teacher")
    params = {**flatten(profile.teacher, "teacher."), "seed": seed}
    outputs = [paths.teacher_dir(dataset)]
    resume = stage.checkpoints(params=params, inputs=[data_dir])
    with stage.tracked(params=params, inputs=[data_dir], outputs=outputs) as mlflow:
        start = time.perf_counter()
        model, extra, history = obtain_teacher(
            profile.teacher,
            data,
            profile=dataset,
            seed=seed,
            device=device,
            progress=stage.progress,
            log_epoch=lambda h: mlflow.log_metrics(
                {"train_loss": h["loss"], "val_top1_epoch": h["val_top1"]}, step=h["epoch"]
            ),
            checkpoint=resume.loop("teacher", "teacher"),
        )
        mlflow.set_tags({k.replace("_", "."): v for k, v in extra.items()})
        seconds = time.perf_counter() - start
        acc = split_validator(data, device=device)(model, 256)
        metrics = {"val_top1": acc.top1, "val_top5": acc.top5}
        with atomic_file(paths.teacher_path(dataset)) as tmp:
            info = {"val_top1": acc.top1, "profile": dataset, "seed": seed, **extra}
            save_teacher(model, tmp, model_cfg=profile.teacher.model, data=data, extra=info)
        mlflow.log_metrics({**metrics, "seconds": seconds, "peak_mem_mb": peak_memory_mb(device)})
        write_json(paths.teacher_metrics_path(dataset), metrics)  # run metadata: MLflow only
        write_csv(paths.teacher_curve_path(dataset), history, ["epoch", "loss", "val_top1", "lr"])
    resume.clear()


if __name__ == "__main__":
    run_main(main)
