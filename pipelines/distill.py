"""Stage ``distill``: run one method for one (dataset profile, IPC).

    python -m pipelines.distill --dataset digits --method random --ipc 10
    python -m pipelines.distill --dataset digits --method random --ipc 10 --classes 0:5

Outputs ``distilled/<profile>/<method>/ipc<k>/``: ``set.pt`` (images in normalised space,
labels, optional weights), ``preview.png`` (a grid, one row per class) and ``meta.json``
(method config, seed, wall time, peak memory, images per second). ``--classes a:b``
distils only classes ``a..b-1`` (for sharding; the result equals that slice of a full run).
"""

from __future__ import annotations

import time

import torch

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from pipelines.registry import get_method, method_config
from wmdd import paths
from wmdd.config import flatten, to_dict
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.synthetic_set import AUX_FILE, META_FILE, PREVIEW_FILE, SET_FILE, preview_grid
from wmdd.tracking.runs import stage_run
from wmdd.utils import (
    atomic_dir,
    derive_seed,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    write_json,
)


def parse_classes(spec: str | None, num_classes: int) -> range:
    if not spec:
        return range(num_classes)
    try:
        lo, hi = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--classes: expected 'a:b', got {spec!r}") from None
    if not 0 <= lo < hi <= num_classes:
        raise ValueError(f"--classes {spec}: expected 0 <= a < b <= {num_classes}")
    return range(lo, hi)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, method=True, ipc=True)
    parser.add_argument("--classes", help="class range a:b to distil (default: all)")
    args = parser.parse_args(argv)
    params = load_checked(args.params)
    profile = params.profile(args.dataset)
    spec = get_method(args.method)
    config = method_config(params, args.method, args.dataset)
    device = resolve_device(params.benchmark.device)
    data = load_data(paths.data_dir(args.dataset), profile.data)
    classes = parse_classes(args.classes, data.num_classes)
    teacher_file = paths.teacher_path(args.dataset)
    teacher = load_teacher(teacher_file, device=device) if spec.needs_teacher else None
    seed = derive_seed(params.benchmark.seed, args.dataset, args.method)
    inputs = [paths.data_dir(args.dataset)] + ([teacher_file] if spec.needs_teacher else [])
    tags = stage_tags(args, profile, classes=f"{classes.start}:{classes.stop}")
    with stage_run(
        experiment=params.benchmark.experiment,
        stage="distill",
        run_name=f"distill/{args.dataset}/{args.method}/ipc{args.ipc}",
        tags=tags,
        params={**flatten(config, "method."), "seed": seed, "ipc": args.ipc},
        inputs=inputs,
        device=device,
    ) as mlflow:
        reset_peak_memory(device)
        start = time.perf_counter()
        synthetic = spec.fn(
            teacher=teacher,
            data=data,
            classes=classes,
            ipc=args.ipc,
            config=config,
            seed=seed,
            device=device,
            progress=not args.no_progress,
        )
        seconds = time.perf_counter() - start
        timings = {
            f"time_{k}_seconds": float(v) for k, v in synthetic.aux.pop("timings", {}).items()
        }
        metrics = {
            **timings,
            "distill_seconds": seconds,
            "peak_mem_mb": peak_memory_mb(device),
            "images": len(synthetic.labels),
            "images_per_second": len(synthetic.labels) / max(seconds, 1e-9),
        }
        grid = preview_grid(data.denormalize(synthetic.images), synthetic.labels, data.num_classes)
        with atomic_dir(paths.distilled_dir(args.dataset, args.method, args.ipc)) as tmp:
            synthetic.save(tmp / SET_FILE)
            if synthetic.aux:
                torch.save(synthetic.aux, tmp / AUX_FILE)
            grid.save(tmp / PREVIEW_FILE)
            write_json(
                tmp / META_FILE,
                {
                    **tags,
                    "config": to_dict(config),
                    "seed": seed,
                    **metrics,
                    "mlflow_run_id": mlflow.active_run().info.run_id,
                },
            )
            mlflow.log_artifact(str(tmp / PREVIEW_FILE))
        mlflow.log_metrics(metrics)


if __name__ == "__main__":
    run_main(main)
