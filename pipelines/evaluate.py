"""Stage ``evaluate``: train students on one distilled set by the profile's protocol.

    python -m pipelines.evaluate --dataset digits --method random --ipc 10

One student per eval seed (``benchmark.eval_seeds``), each from scratch; validation on the
full validation split. Writes ``results/<profile>/<method>/ipc<k>/metrics.json`` (declared
as DVC metrics): final top-1 (the headline), top-5 and best-epoch top-1 per seed, their
mean / std (sample std, n - 1) / n, the protocol hash and the MLflow run id.
"""

from __future__ import annotations

import time

from pipelines.common import base_parser, load_checked, run_main, stage_tags
from wmdd import paths
from wmdd.config import flatten
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.protocol.runner import evaluate_seed, split_validator, summarise
from wmdd.protocol.soft import protocol_hash
from wmdd.synthetic_set import SET_FILE, SyntheticSet
from wmdd.tracking.runs import stage_run
from wmdd.utils import peak_memory_mb, resolve_device, write_json


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__, method=True, ipc=True).parse_args(argv)
    params = load_checked(args.params)
    profile, bench = params.profile(args.dataset), params.benchmark
    device = resolve_device(bench.device)
    data_dir = paths.data_dir(args.dataset)
    set_dir = paths.distilled_dir(args.dataset, args.method, args.ipc)
    labels_dir = paths.labels_dir(args.dataset, args.method, args.ipc)
    teacher_file = paths.teacher_path(args.dataset)
    data = load_data(data_dir, profile.data)
    synthetic = SyntheticSet.load(set_dir / SET_FILE)
    protocol = profile.protocol
    phash = protocol_hash(protocol, eval_seeds=bench.eval_seeds, base_seed=bench.seed)
    tags = stage_tags(args, profile, protocol=protocol.kind, protocol_hash=phash)
    with stage_run(
        experiment=bench.experiment,
        stage="evaluate",
        run_name=f"evaluate/{args.dataset}/{args.method}/ipc{args.ipc}",
        tags=tags,
        params={**flatten(protocol, "protocol."), "eval_seeds": list(bench.eval_seeds)},
        inputs=[data_dir, set_dir, labels_dir, teacher_file],
        device=device,
    ) as mlflow:
        start = time.perf_counter()
        teacher = load_teacher(teacher_file, device=device) if protocol.kind == "soft" else None
        validate = split_validator(data, device=device)  # one loader for every seed
        per_seed: dict[int, dict] = {}
        for s in bench.eval_seeds:
            result = evaluate_seed(
                protocol,
                eval_seed=s,
                data=data,
                synthetic=synthetic,
                teacher=teacher,
                labels_dir=labels_dir,
                profile=args.dataset,
                ipc=args.ipc,
                base_seed=bench.seed,
                device=device,
                progress=not args.no_progress,
                validate=validate,
            )
            per_seed[s] = result
            for h in result["history"]:
                mlflow.log_metrics(
                    {f"seed{s}.top1": h["top1"], f"seed{s}.loss": h["loss"]}, step=h["epoch"]
                )
            mlflow.log_metrics(
                {
                    f"seed{s}.final_top1": result["top1"],
                    f"seed{s}.final_top5": result["top5"],
                    f"seed{s}.best_top1": result["best_top1"],
                }
            )
        summary = summarise(per_seed)
        seconds = time.perf_counter() - start
        mlflow.log_metrics(
            {
                **{k: float(v) for k, v in summary.items()},
                "eval_seconds": seconds,
                "peak_mem_mb": peak_memory_mb(device),
            }
        )
        write_json(
            paths.results_path(args.dataset, args.method, args.ipc),
            {
                **summary,
                "eval_seconds": seconds,
                "protocol_hash": phash,
                "mlflow_run_id": mlflow.active_run().info.run_id,
                "per_seed": {
                    str(s): {k: r[k] for k in ("top1", "top5", "best_top1", "best_epoch")}
                    for s, r in per_seed.items()
                },
            },
        )


if __name__ == "__main__":
    run_main(main)
