"""Stage ``distill``: run one method for one (dataset profile, IPC), once per distilled set.

    python -m pipelines.distill --dataset digits --method random --ipc 10
    python -m pipelines.distill --dataset digits --method random --ipc 10 --classes 0:5

Outputs ``distilled/<profile>/<method>/ipc<k>/set<s>/`` for every set s of the cell
(``benchmark.sets``, or ``methods.<method>.sets``; one for a deterministic method such as
herding), each distilled from its own seed (``pipelines.registry.set_seed``; set 0 keeps
the seed cells had before sets existed): ``set.pt`` (normalised images, labels, optional
weights), ``aux.pt``, ``preview.png`` and ``meta.json`` (cell, set, config, seed). A set
finished before an interruption is kept and not distilled again. ``--classes a:b`` distils
a *shard* of every set (kept in the stage's checkpoint directory; no output); the run over
all classes merges shards that tile them (``python -m pipelines.parallel --shards K``).
"""

from __future__ import annotations

import statistics

import torch

from pipelines.common import open_stage, run_main
from pipelines.registry import method_sets, resolve_method, set_seed
from wmdd import paths
from wmdd.config import flatten, to_dict
from wmdd.data import load_data
from wmdd.models.teacher import load_teacher
from wmdd.synthetic_set import (
    SyntheticSet,
    distill_classes,
    parse_class_range,
    save_distilled,
    set_state,
)
from wmdd.tracking.runs import log_curves
from wmdd.utils import atomic_dir


def cell_metrics(per_set: dict[int, dict[str, float]]) -> dict[str, float]:
    """The cell's metrics over its sets: per set as ``set<s>.<name>``, and the mean over
    sets of each (the cost of one set; the peak memory is the largest)."""
    out = {f"set{s}.{k}": v for s, m in per_set.items() for k, v in m.items()}
    for key in next(iter(per_set.values())):
        values = [m[key] for m in per_set.values() if key in m]
        out[key] = max(values) if key == "peak_mem_mb" else statistics.fmean(values)
    return {**out, "sets": float(len(per_set))}


def loss_curves(aux: dict, *, prefix: str) -> dict[str, list[float]]:
    """A method's per-iteration loss curves from its set's ``aux``: the synthesis loop's
    components (WMDD: ``feature``, ``bn``; SRe2L: ``ce``, ``bn``; and ``loss``), averaged
    over batches, as ``<prefix>synthesis.<name>``; DM's loss as ``<prefix>dm.loss``."""
    curves = {}
    synthesis = aux.get("synthesis") or {}
    if "curve_sum" in synthesis:
        mean = synthesis["curve_sum"] / synthesis["curve_batches"]  # (T, K)
        for j, name in enumerate(synthesis["curve_names"]):
            curves[f"{prefix}synthesis.{name}"] = mean[:, j].tolist()
    if isinstance(aux.get("loss"), torch.Tensor):
        curves[f"{prefix}dm.loss"] = aux["loss"].tolist()
    return curves


def main(argv: list[str] | None = None) -> None:
    stage = open_stage(
        "distill", __doc__, argv, method=True, ipc=True,
        add_arguments=lambda p: p.add_argument("--classes", help="class range a:b (a shard)"),
    )  # fmt: skip
    args, device = stage.args, stage.device
    spec, config = resolve_method(stage.params, args.method, args.dataset)
    sets = method_sets(stage.params, args.method)
    data = load_data(paths.data_dir(args.dataset), stage.profile.data)
    classes = parse_class_range(args.classes, data.num_classes)
    teacher_file = paths.teacher_path(args.dataset)
    teacher = load_teacher(teacher_file, device=device) if spec.needs_teacher else None
    seeds = {s: set_seed(stage.bench.seed, args.dataset, args.method, s) for s in sets}
    inputs = [paths.data_dir(args.dataset)] + ([teacher_file] if teacher is not None else [])
    method_inputs = {}
    if spec.uses_teacher_stats:  # imported here: a method without it never loads the module
        from wmdd.synthesis.teacher_stats import load_teacher_stats

        stats_file = paths.teacher_stats_path(args.dataset)
        method_inputs["teacher_stats"] = load_teacher_stats(stats_file, teacher_file)
        inputs.append(stats_file)
    run_params = {**flatten(config, "method."), "seed": seeds[0], "ipc": args.ipc,
                  "sets": len(sets), "set_seeds": list(seeds.values())}  # fmt: skip
    resumes = {
        s: stage.checkpoints(
            params=({**run_params, "seed": seeds[s]}, stage.tags()), inputs=inputs, part=f"set{s}"
        )
        for s in sets
    }
    shard = len(classes) < data.num_classes  # a part of the cell: no output
    tags = stage.tags(classes=f"{classes.start}:{classes.stop}", **{"shard": True} if shard else {})
    out = paths.distilled_dir(args.dataset, args.method, args.ipc)
    with stage.tracked(
        params=run_params, inputs=inputs, outputs=[] if shard else [out],
        method_source=spec.source, **tags,
    ) as mlflow:  # fmt: skip
        per_set: dict[int, dict[str, float]] = {}
        if shard:
            for s in sets:
                _, per_set[s] = _distill_set(
                    resumes[s], spec, classes, data, args, config, seeds[s], teacher, device,
                    stage.progress, method_inputs,
                )  # fmt: skip
        else:
            with atomic_dir(out) as tmp:
                for s in sets:
                    synthetic, per_set[s] = _distill_set(
                        resumes[s], spec, classes, data, args, config, seeds[s], teacher,
                        device, stage.progress, method_inputs,
                    )  # fmt: skip
                    assert synthetic is not None
                    # meta.json: what defines the set, no run metadata (same inputs, same bytes)
                    meta = {**tags, "set": s, "config": to_dict(config), "seed": seeds[s],
                            "images": len(synthetic.labels)}  # fmt: skip
                    if spec.source != "built-in":  # a plugin: its distribution and version
                        meta["method_source"] = spec.source
                    if isinstance(synthetic.aux.get("source"), dict):  # an external set's files
                        meta["source"] = synthetic.aux["source"]
                        mlflow.set_tag(f"set{s}.source_sha256", meta["source"]["sha256"])
                    preview = save_distilled(paths.set_dir(tmp, s), synthetic, data, meta=meta)
                    mlflow.log_artifact(str(preview), artifact_path=f"set{s}")
                    log_curves(mlflow, loss_curves(synthetic.aux, prefix=f"set{s}."))
        mlflow.log_metrics(cell_metrics(per_set))
    if not shard:
        for resume in resumes.values():
            resume.clear()


def _distill_set(resume, spec, classes, data, args, config, seed, teacher, device, progress,
                 method_inputs) -> tuple[SyntheticSet | None, dict[str, float]]:  # fmt: skip
    """One set of the cell (or its shard): reused when a previous run finished it."""
    shard = len(classes) < data.num_classes
    done = None if shard else resume.result("set")
    if done is not None:
        return SyntheticSet(**done["set"]), done["metrics"]
    synthetic, metrics = distill_classes(
        spec.fn, classes=classes, num_classes=data.num_classes, ipc=args.ipc, resume=resume,
        method=args.method, teacher=teacher, data=data, config=config, seed=seed,
        device=device, progress=progress, **method_inputs,
    )  # fmt: skip
    if synthetic is not None:
        resume.save_result("set", {"set": set_state(synthetic), "metrics": metrics})
    return synthetic, metrics


if __name__ == "__main__":
    run_main(main)
