"""One eval seed of the protocol on a synthetic set, and the summary over seeds.

This is what the ``evaluate`` stage runs per seed: a student built from the eval seed,
trained by the profile's selected protocol (soft labels replayed from the ``relabel``
stage's files in ``stored`` mode, drawn with the teacher in ``online`` mode, or hard labels),
validated on the full validation split.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from wmdd.config import ProtocolConfig
from wmdd.data.lazy import LazySplitSet, make_loader
from wmdd.data.prepared import PreparedData
from wmdd.models.teacher import Accuracy, evaluate, evaluate_loader
from wmdd.protocol.hard import train_student_hard
from wmdd.protocol.soft import (
    OnlineLabels,
    StoredLabels,
    build_student,
    relabel_seed,
    student_seed,
    train_student_soft,
)
from wmdd.synthetic_set import SyntheticSet

Validate = Callable[[nn.Module, int], Accuracy]  # (model, batch size) -> accuracy on val


def split_validator(data: PreparedData | LazySplitSet, *, device: torch.device) -> Validate:
    """``validate(model, batch_size)``: top-1/top-5 of a model on the whole validation split.

    Cached datasets slice their val tensors; lazy ones (ImageNet-1K) stream the split through
    a DataLoader of ``data.workers`` decoding processes (pinned memory on a GPU), kept alive
    between calls, one loader per batch size. Unreadable validation images are dropped
    (and logged) only when the profile sets ``data.skip_corrupt``.
    """
    if isinstance(data, PreparedData):
        return lambda model, batch_size: evaluate(
            model,
            data.val_x,
            data.val_y,
            batch_size=batch_size,
            device=device,
            normalize=data.normalize,
        )
    loaders: dict[int, DataLoader] = {}

    def validate(model: nn.Module, batch_size: int) -> Accuracy:
        if batch_size not in loaders:
            loaders[batch_size] = make_loader(
                data.val, batch_size, workers=data.workers, device=device
            )
        return evaluate_loader(model, loaders[batch_size], device=device, normalize=data.normalize)

    return validate


def stored_labels_path(labels_dir: Path, eval_seed: int) -> Path:
    return labels_dir / f"seed{eval_seed}.pt"


def evaluate_seed(
    protocol: ProtocolConfig,
    *,
    eval_seed: int,
    data: PreparedData | LazySplitSet,
    synthetic: SyntheticSet,
    teacher: nn.Module | None,
    labels_dir: Path,
    profile: str,
    ipc: int,
    base_seed: int,
    device: torch.device,
    validate: Validate,
    progress: bool = True,
) -> dict:
    """Trains one student and scores it with ``validate`` (:func:`split_validator`, made once
    per cell so that a lazy split's loader serves every seed); returns
    ``train_student_*``'s result dict."""
    spec = protocol.selected()
    student = build_student(
        spec.student,
        num_classes=data.num_classes,
        in_chans=data.channels,
        resolution=data.resolution,
        seed=student_seed(base_seed, profile, ipc, eval_seed),
    )
    view_seed = relabel_seed(base_seed, profile, ipc, eval_seed)
    images = synthetic.images.to(device)
    common: dict[str, Any] = dict(
        validate=validate,
        device=device,
        progress=progress,
    )
    if protocol.kind == "hard":
        assert protocol.hard is not None
        return train_student_hard(
            student=student,
            images=images,
            labels=synthetic.labels,
            cfg=protocol.hard,
            seed=view_seed,
            **common,
        )
    soft = protocol.soft
    assert soft is not None
    labels: StoredLabels | OnlineLabels
    if soft.relabel_mode == "stored":
        labels = StoredLabels.load(stored_labels_path(labels_dir, eval_seed))
    else:
        if teacher is None:
            raise ValueError("online relabelling needs the teacher")
        labels = OnlineLabels(teacher, soft, seed=view_seed)
    return train_student_soft(student=student, labels=labels, images=images, cfg=soft, **common)


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean, sample std (n - 1) and n of the final top-1, top-5 and best-epoch top-1."""
    out: dict = {}
    for key in ("top1", "top5", "best_top1"):
        values = [r[key] for r in per_seed.values()]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["n"] = len(per_seed)
    return out
