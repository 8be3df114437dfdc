"""Stage ``teacher``: train the dataset profile's teacher, or load pretrained weights
(``teacher.pretrained``, e.g. torchvision's ResNet-18 IMAGENET1K_V1 for ImageNet-1K).

    python -m pipelines.teacher --dataset digits

Outputs ``models/<profile>/teacher.pt`` (weights + the config to rebuild them strictly)
and ``models/<profile>/metrics.json`` (validation top-1/top-5, wall time).
"""

from __future__ import annotations

import logging
import time

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from wmdd import paths
from wmdd.config import flatten
from wmdd.data import load_data
from wmdd.data.prepared import PreparedData, is_lazy
from wmdd.models.teacher import pretrained_teacher, save_teacher, train_teacher
from wmdd.protocol.runner import split_validator
from wmdd.tracking.runs import stage_run
from wmdd.utils import (
    atomic_file,
    derive_seed,
    peak_memory_mb,
    resolve_device,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__).parse_args(argv)
    params = load_checked(args.params)
    profile = params.profile(args.dataset)
    device = resolve_device(params.benchmark.device)
    data_dir = paths.data_dir(args.dataset)
    if is_lazy(data_dir) and not profile.teacher.pretrained:
        raise ValueError(
            f"datasets.{args.dataset}.teacher.pretrained: {profile.data.name} is prepared lazily "
            "and its teacher is loaded, not trained here; set e.g. "
            "'torchvision:resnet18.IMAGENET1K_V1'"
        )
    data = load_data(data_dir, profile.data)
    seed = derive_seed(params.benchmark.seed, args.dataset, "teacher")
    with stage_run(
        experiment=params.benchmark.experiment,
        stage="teacher",
        run_name=f"teacher/{args.dataset}",
        tags=stage_tags(args, profile),
        params={**flatten(profile.teacher, "teacher."), "seed": seed},
        inputs=[data_dir],
        device=device,
    ) as mlflow:
        start = time.perf_counter()

        def log_epoch(h: dict) -> None:
            logging.getLogger("pipelines.teacher").info(
                "epoch %d: loss %.4f, val top-1 %.2f", h["epoch"], h["loss"], h["val_top1"]
            )
            mlflow.log_metrics(
                {"train_loss": h["loss"], "val_top1_epoch": h["val_top1"]}, step=h["epoch"]
            )

        extra: dict = {}
        if profile.teacher.pretrained:
            model, info = pretrained_teacher(profile.teacher, data, device=device)
            extra = {"pretrained": info.spec, "pretrained_sha256": info.sha256}
            mlflow.set_tags({"pretrained": info.spec, "pretrained.sha256": info.sha256})
            logging.getLogger("pipelines.teacher").info(
                "loaded %s from %s (sha256 %s)", info.spec, info.path, info.sha256
            )
        else:
            assert isinstance(data, PreparedData)  # lazy data was refused above
            model, _ = train_teacher(
                profile.teacher,
                data,
                seed=seed,
                device=device,
                progress=not args.no_progress,
                on_epoch=log_epoch,
            )
        seconds = time.perf_counter() - start
        acc = split_validator(data, device=device)(model, 256)
        metrics = {
            "val_top1": acc.top1,
            "val_top5": acc.top5,
            "seconds": seconds,
            "peak_mem_mb": peak_memory_mb(device),
        }
        with atomic_file(paths.teacher_path(args.dataset)) as tmp:
            save_teacher(
                model,
                tmp,
                model_cfg=profile.teacher.model,
                data=data,
                extra={"val_top1": acc.top1, "profile": args.dataset, "seed": seed, **extra},
            )
        mlflow.log_metrics(metrics)
        write_json(
            paths.teacher_metrics_path(args.dataset),
            {**metrics, "mlflow_run_id": mlflow.active_run().info.run_id},
        )


if __name__ == "__main__":
    run_main(main)
