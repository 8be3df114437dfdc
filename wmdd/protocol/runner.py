"""One eval seed of the protocol on a synthetic set, and the summary over seeds.

This is what the ``evaluate`` stage runs per seed: a student built from the seed plan's
student seed, trained by the cell's protocol (soft labels replayed from the ``relabel``
stage's files in ``stored`` mode, drawn with the teacher in ``online`` mode, or hard labels),
validated on the full validation split.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wmdd import paths
from wmdd.checkpoint import Checkpointer, StageCheckpoints
from wmdd.config import ModelConfig
from wmdd.data.lazy import LazySplitSet
from wmdd.data.prepared import PreparedData
from wmdd.distributed import Ranks
from wmdd.models.accuracy import Validate, split_validator
from wmdd.models.registry import create_model
from wmdd.protocol.hard import train_student_hard
from wmdd.protocol.plan import ProtocolPlan, SeedPlan
from wmdd.protocol.soft import OnlineLabels, StoredLabels, train_student_soft
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import level_values, peak_memory_mb, seeded_init, write_csv, write_json


def build_student(
    model_cfg: ModelConfig, *, num_classes: int, in_chans: int, resolution: int, seed: int
) -> nn.Module:
    """The protocol's student, freshly initialised from ``seed``."""
    with seeded_init(seed):
        return create_model(
            model_cfg.name,
            num_classes=num_classes,
            in_chans=in_chans,
            resolution=resolution,
            **model_cfg.kwargs,
        )


def evaluate_seed(
    plan: ProtocolPlan,
    seed: SeedPlan,
    *,
    data: PreparedData | LazySplitSet,
    synthetic: SyntheticSet,
    teacher: nn.Module | None,
    labels_dir: Path,
    device: torch.device,
    validate: Validate,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    ranks: Ranks | None = None,
) -> dict:
    """Trains one student and scores it with ``validate``
    (:func:`wmdd.models.accuracy.split_validator`, made once per cell so that a lazy split's
    loader serves every seed); returns ``train_student_*``'s result dict.

    ``teacher`` is needed only when ``plan.evaluate_needs_teacher`` (online relabelling);
    ``on_epoch`` receives each validated epoch of the soft protocol; ``checkpoint`` makes
    the training resumable.
    """
    student = build_student(
        plan.settings.student,
        num_classes=data.num_classes,
        in_chans=data.channels,
        resolution=data.resolution,
        seed=seed.student_seed,
    )
    images = synthetic.images.to(device)
    if plan.kind == "hard":
        if ranks is not None:
            raise ValueError("the hard-label protocol trains in one process (no torchrun)")
        return train_student_hard(
            student=student,
            images=images,
            labels=synthetic.labels,
            cfg=plan.hard,
            seed=seed.view_seed,
            validate=validate,
            device=device,
            progress=progress,
            checkpoint=checkpoint,
        )
    labels: StoredLabels | OnlineLabels
    if plan.stores_labels:
        labels = StoredLabels.load(paths.stored_labels_path(labels_dir, seed.eval_seed))
    else:
        if teacher is None:
            raise ValueError("online relabelling needs the teacher")
        labels = OnlineLabels(teacher, plan.soft, seed=seed.view_seed)
    return train_student_soft(
        student=student,
        labels=labels,
        images=images,
        cfg=plan.soft,
        validate=validate,
        device=device,
        progress=progress,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        ranks=ranks,
        weights=synthetic.weights,
    )


def summarise(per_set: dict[int, dict[int, dict]]) -> dict:
    """The cell's numbers over its distilled sets and eval seeds (``per_set[s][e]``).

    ``<key>_mean`` is the mean over sets of each set's mean over its eval seeds. The spread
    is taken at the level of the distilled set, where a method's result varies: ``<key>_std``
    is the sample std (n - 1) of the per-set means and ``n`` the number of sets, so the std
    includes which images were drawn or which noise the synthesis started from. A cell with
    one set (a deterministic method, or ``sets: 1``) has no set-level spread to measure: its
    std and n are over eval seeds (``std_over`` says which). ``<key>_samples`` lists the
    values behind the std, for the report's tests."""
    if not per_set:
        raise ValueError("summarise: no distilled set was evaluated")
    over = "sets" if len(per_set) > 1 else "eval seeds"
    out: dict = {}
    for key in ("top1", "top5", "best_top1"):
        samples = level_values(
            {s: [r[key] for r in seeds.values()] for s, seeds in per_set.items()}
        )
        out[f"{key}_mean"] = statistics.fmean(samples)
        out[f"{key}_std"] = statistics.stdev(samples) if len(samples) > 1 else 0.0
        out[f"{key}_samples"] = samples
    out["n"] = len(out["top1_samples"])
    out["sets"] = len(per_set)
    out["eval_seeds"] = len(next(iter(per_set.values())))
    out["std_over"] = over
    return out


def evaluate_seeds(
    plan: ProtocolPlan,
    *,
    data: PreparedData | LazySplitSet,
    synthetic: SyntheticSet,
    teacher: nn.Module | None,
    labels_dir: Path,
    device: torch.device,
    resume: StageCheckpoints,
    on_seed: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[int, dict]:
    """:func:`evaluate_seed` for every seed of the plan, with one validator for all: a seed
    finished before an interruption is taken from ``resume``, an interrupted one resumes
    from its checkpoint. ``on_seed(eval_seed, result)`` follows each seed."""
    validate = split_validator(data, device=device)
    per_seed: dict[int, dict] = {}
    for seed in plan.seeds:
        name = f"seed{seed.eval_seed}"
        result = resume.result(name)
        if result is None:
            start = time.perf_counter()
            result = evaluate_seed(
                plan,
                seed,
                data=data,
                synthetic=synthetic,
                teacher=teacher,
                labels_dir=labels_dir,
                device=device,
                validate=validate,
                progress=progress,
                checkpoint=resume.loop(name, f"student {name}"),
                ranks=ranks,
            )
            if ranks is not None and not ranks.main:  # rank 0 keeps the result
                continue
            result["seconds"] = time.perf_counter() - start  # of this run (not of resumes)
            resume.save_result(name, result)
        per_seed[seed.eval_seed] = result
        if on_seed is not None:
            on_seed(seed.eval_seed, result)
    return per_seed


def store_labels(
    teacher: nn.Module, images: torch.Tensor, plan: ProtocolPlan, out_dir: Path, *, progress: bool
) -> int:
    """Relabel mode ``stored``: every eval seed's views and soft labels written to
    ``out_dir/seed<s>.pt``; returns the bytes stored."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nbytes = 0
    for seed in plan.seeds:
        labels = StoredLabels.compute(
            teacher, images, plan.soft, seed=seed.view_seed, progress=progress
        )
        labels.save(paths.stored_labels_path(out_dir, seed.eval_seed))
        nbytes += labels.nbytes()
    return nbytes


def log_seed(mlflow, eval_seed: int, result: dict, *, set_index: int = 0) -> None:
    """Logs one student's learning curve (``set<s>.seed<e>.top1`` / ``.loss`` per evaluated
    epoch) and final numbers to the active MLflow run: the name says which distilled set
    and which eval seed the evaluation belongs to."""
    name = f"set{set_index}.seed{eval_seed}"
    for h in result["history"]:
        curve = {"top1": h["top1"], "top5": h["top5"], "loss": h["loss"]}
        mlflow.log_metrics({f"{name}.{k}": v for k, v in curve.items()}, step=h["epoch"])
    mlflow.log_metrics(
        {
            f"{name}.final_top1": result["top1"],
            f"{name}.final_top5": result["top5"],
            f"{name}.best_top1": result["best_top1"],
        }
    )


def log_summary(mlflow, per_set: dict[int, dict[int, dict]], *, device: torch.device) -> dict:
    """Logs the cell's summary (:func:`summarise`), its training time (per set: all its
    eval seeds, wherever they ran; the mean over sets) and this process's peak memory;
    returns the summary."""
    summary = summarise(per_set)
    per_set_seconds = [sum(r.get("seconds", 0.0) for r in seeds.values()) for seeds in per_set.values()]  # fmt: skip
    cost = {
        "eval_seconds": statistics.fmean(per_set_seconds),
        "eval_seconds_total": sum(per_set_seconds),
        "peak_mem_mb": peak_memory_mb(device),
    }
    numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
    mlflow.log_metrics({**numbers, **cost})
    mlflow.set_tag("std_over", summary["std_over"])
    return summary


def write_results(
    per_set: dict[int, dict[int, dict]],
    summary: dict,
    *,
    protocol_hash: str,
    record: Path,
    curve: Path,
) -> None:
    """The evaluate stage's outputs: ``metrics.json`` (:func:`results_record`) and the
    mean validation curve ``curve.csv`` (a DVC plot)."""
    write_json(record, results_record(summary, per_set, protocol_hash=protocol_hash))
    write_csv(curve, mean_curve(per_set), ["epoch", "top1", "top5"])


def mean_curve(per_set: dict[int, dict[int, dict]]) -> list[dict]:
    """The students' validation curve, mean over every set and eval seed at each evaluated
    epoch."""
    histories = [r["history"] for seeds in per_set.values() for r in seeds.values()]
    return [
        {
            "epoch": points[0]["epoch"],
            "top1": statistics.fmean(p["top1"] for p in points),
            "top5": statistics.fmean(p["top5"] for p in points),
        }
        for points in zip(*histories, strict=True)
    ]


def results_record(
    summary: dict, per_set: dict[int, dict[int, dict]], *, protocol_hash: str
) -> dict:
    """The evaluate stage's ``metrics.json``: the summary, the protocol hash and per set and
    eval seed the final top-1 / top-5, best top-1 and its epoch (no run metadata: the wall
    time and memory are MLflow metrics of the run)."""
    return {
        **summary,
        "protocol_hash": protocol_hash,
        "per_set": {
            str(s): {
                str(e): {k: r[k] for k in ("top1", "top5", "best_top1", "best_epoch")}
                for e, r in seeds.items()
            }
            for s, seeds in per_set.items()
        },
    }
