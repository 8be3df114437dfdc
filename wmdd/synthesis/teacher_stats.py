r"""What a method needs to know about the teacher on the real data, computed in one pass.

WMDD needs, for every class, the teacher's penultimate features :math:`\phi(x)` of all its
training images (for the barycenters) and the per-class statistics of every BN layer's input
(its BN targets); herding needs the same features. Computing them separately costs two
teacher passes over the training set, for every IPC and again for herding. Here one pass
per class does both: ``forward_features`` on a batch gives the features, and the forward
hooks of :class:`wmdd.synthesis.bn_stats.BNInputRecorder` read the BN inputs of the same
forward (the BN layers all lie before the head).

The result, :class:`TeacherStats`, is computed once per (dataset, teacher) by the
``teacher_stats`` stage (``models/<profile>/teacher_stats.pt``) and read by every IPC of
WMDD and by herding. It is *bit-identical* to the two separate passes at the same batch
size (``tests/test_teacher_stats.py``): the same batches go through the same code (both BN
poolings, ``exact`` and ``batch_mean``, are kept, so the official-code ablation needs no
second pass). The former feature pass used batches of 256; on CPU a ResNet-18 or ConvNet
gives each image the same features at 100 or 256 images per batch, but not in a batch of one
image (another kernel; a difference around 1e-6), so a class whose size leaves a last batch of
one can differ from the former features in its last image.

Size: features are float32, ``4 * N * D`` bytes (Imagenette at 64 px with ResNet-18: 9,469 x
512, 19 MB; ImageNet-1K: 2.6 GB). They are loaded memory-mapped, so a class-range shard
reads only its classes' pages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmdd.data.prepared import TrainingImages
from wmdd.synthesis.bn_stats import (
    BatchMeanPool,
    BNInputRecorder,
    BNStats,
    ExactPool,
    batch_channel_stats,
)
from wmdd.utils import ArtifactError, file_digest, load_artifact

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "TeacherStats",
    "compute_teacher_stats",
    "load_teacher_stats",
    "teacher_stats_for",
]

# The official WMDD code computes its BN statistics in batches of 100 images of one class
# ("batch_mean" pooling depends on it; "exact" pooling and the features do not).
DEFAULT_BATCH_SIZE = 100
POOLINGS = ("exact", "batch_mean")
_KEYS = ("classes", "counts", "features", "bn", "batch_size", "teacher_digest")


@dataclass(frozen=True)
class TeacherStats:
    """Per-class teacher features and BN-input statistics of the real training images.

    Attributes:
        classes: Global index of each class held, ascending.
        features: One float32 (n_c, D) tensor per class of ``classes``, rows in dataset order.
        bn: ``{"exact": BNStats, "batch_mean": BNStats}``, row r of each layer for
            ``classes[r]`` (see :mod:`wmdd.synthesis.bn_stats` for the two poolings).
        batch_size: Images per teacher forward (within one class).
        teacher_digest: sha256 of the teacher checkpoint they come from ("" if unknown).
    """

    classes: tuple[int, ...]
    features: list[Tensor]
    bn: dict[str, BNStats]
    batch_size: int
    teacher_digest: str = ""

    def __post_init__(self) -> None:
        if len(self.features) != len(self.classes):
            raise ValueError("TeacherStats: one feature tensor per class expected")
        if sorted(self.bn) != sorted(POOLINGS):
            raise ValueError(f"TeacherStats: bn must hold the poolings {POOLINGS}")
        for pooling, stats in self.bn.items():
            if stats.num_rows != len(self.classes):
                raise ValueError(
                    f"TeacherStats: {pooling} BN statistics have {stats.num_rows} rows for "
                    f"{len(self.classes)} classes"
                )

    def class_features(self, classes: Sequence[int]) -> list[Tensor]:
        """The (n_c, D) features of each of ``classes``, in that order."""
        return [self.features[r] for r in self._rows(classes)]

    def bn_stats(
        self, classes: Sequence[int], pooling: Literal["exact", "batch_mean"] = "exact"
    ) -> BNStats:
        """The BN targets of ``classes`` (rows in that order) under ``pooling``."""
        rows = torch.tensor(self._rows(classes), dtype=torch.long)
        stats = self.bn[pooling]
        return BNStats(
            layer_names=stats.layer_names,
            mean=[m[rows] for m in stats.mean],
            var=[v[rows] for v in stats.var],
            pooling=pooling,
        )

    def _rows(self, classes: Sequence[int]) -> list[int]:
        index = {c: r for r, c in enumerate(self.classes)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise ValueError(
                f"teacher statistics hold classes {self.classes[0]}..{self.classes[-1]}, "
                f"not {missing}"
            )
        return [index[c] for c in classes]

    def check(self, data: TrainingImages, classes: Sequence[int]) -> None:
        """Raise ValueError unless every class of ``classes`` has one feature row per training
        image of ``data`` (a stale or foreign statistics file)."""
        counts = data.class_counts("train")
        for c, feats in zip(classes, self.class_features(classes), strict=True):
            if len(feats) != counts[c]:
                raise ValueError(
                    f"teacher statistics: class {c} has {len(feats)} feature rows but the "
                    f"dataset has {counts[c]} training images of it; they come from other "
                    "data (re-run the teacher_stats stage)"
                )

    def save(self, path: str | Path) -> None:
        """``torch.save`` as plain tensors, lists and strings (loads with weights_only)."""
        torch.save(
            {
                "classes": list(self.classes),
                "counts": [len(f) for f in self.features],
                "features": torch.cat(self.features),  # (N, D): one mappable tensor
                "bn": {p: s.state_dict() for p, s in self.bn.items()},
                "batch_size": self.batch_size,
                "teacher_digest": self.teacher_digest,
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> TeacherStats:
        """Read a file written by :meth:`save`; errors name the file and the stage to re-run.

        The feature matrix is memory-mapped, so only the classes used are read from disk.
        """
        path = Path(path)
        payload = load_artifact(path, "teacher statistics file", stage="teacher_stats",
                                keys=_KEYS, mmap=True)  # fmt: skip
        try:
            features = list(torch.split(payload["features"], list(payload["counts"])))
            return cls(
                classes=tuple(int(c) for c in payload["classes"]),
                features=features,
                bn={p: BNStats.from_state(s) for p, s in payload["bn"].items()},
                batch_size=int(payload["batch_size"]),
                teacher_digest=str(payload["teacher_digest"]),
            )
        except (ValueError, TypeError, RuntimeError) as err:
            raise ArtifactError(
                f"{path}: not a valid teacher statistics file ({err}); re-create it with "
                "`dvc repro --force` of its teacher_stats stage"
            ) from None


@torch.no_grad()
def compute_teacher_stats(
    teacher: nn.Module,
    data: TrainingImages,
    classes: Sequence[int],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device,
    teacher_digest: str = "",
    progress: bool = True,
) -> TeacherStats:
    """Features and per-class BN statistics of ``classes`` in one teacher pass per class.

    Each class's training images, in dataset order, go through ``teacher.forward_features``
    in batches of ``batch_size`` images of that class only (normalised per batch on
    ``device``). Every BN input of a batch updates both poolings of that layer; the
    features are kept as float32 on the CPU.

    Args:
        teacher: A model of :mod:`wmdd.models.registry` in eval mode, on ``device``.
        data: The prepared dataset.
        classes: Classes to cover, ascending.
        batch_size: Images per forward.
        device: Where the teacher runs.
        teacher_digest: Recorded with the result (the checkpoint's sha256).
        progress: tqdm bar over classes.

    Raises:
        ValueError: On a teacher in training mode, ``batch_size < 1``, an empty class or a
            model without ``nn.BatchNorm2d``.
    """
    if teacher.training:
        raise ValueError("compute_teacher_stats needs the teacher in eval mode: call .eval()")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = list(classes)
    counts = data.class_counts("train")
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise ValueError(f"classes {empty} have no training images; their statistics are undefined")
    forward_features = cast(Callable[[Tensor], Tensor], teacher.forward_features)
    features: list[Tensor] = []
    pooled: dict[str, list[list[tuple[Tensor, Tensor]]]] = {p: [] for p in POOLINGS}
    with BNInputRecorder(teacher) as recorder:
        names = tuple(recorder.layers)
        for c in tqdm(classes, desc="teacher statistics", disable=not progress):
            images = data.train_of_class(c)  # (n_c, C, R, R) uint8
            exact = [ExactPool() for _ in names]
            batch_mean = [BatchMeanPool() for _ in names]
            chunks = []
            for start in range(0, len(images), batch_size):
                x = data.normalize(images[start : start + batch_size].to(device))
                recorder.clear()
                chunks.append(forward_features(x).float().cpu())  # (b, D)
                for z, pool_e, pool_b in zip(recorder.inputs, exact, batch_mean, strict=True):
                    mean_b, var_b = batch_channel_stats(z)  # (C_l,) each
                    n_b = z.shape[0] * z.shape[2] * z.shape[3]
                    pool_e.add(mean_b, var_b, n_b)
                    pool_b.add(mean_b, var_b, n_b)
            features.append(torch.cat(chunks))  # (n_c, D)
            pooled["exact"].append([p.result() for p in exact])
            pooled["batch_mean"].append([p.result() for p in batch_mean])
    bn = {
        p: BNStats(
            layer_names=names,
            mean=[torch.stack([pc[i][0] for pc in per]).float().cpu() for i in range(len(names))],
            var=[torch.stack([pc[i][1] for pc in per]).float().cpu() for i in range(len(names))],
            pooling=p,
        )
        for p, per in pooled.items()
    }
    return TeacherStats(
        classes=tuple(classes),
        features=features,
        bn=bn,
        batch_size=batch_size,
        teacher_digest=teacher_digest,
    )


def load_teacher_stats(path: str | Path, teacher_file: str | Path) -> TeacherStats:
    """:meth:`TeacherStats.load`, refusing a file computed from another teacher checkpoint
    than ``teacher_file`` (compared by sha256).

    Raises:
        ArtifactError: naming both files and the stage to re-run.
    """
    stats = TeacherStats.load(path)
    digest = file_digest(teacher_file)
    if stats.teacher_digest != digest:
        raise ArtifactError(
            f"{path}: computed from a teacher checkpoint with sha256 "
            f"{stats.teacher_digest[:12] or '(none)'}..., but {teacher_file} has {digest[:12]}...; "
            "re-create it with `dvc repro` of its teacher_stats stage"
        )
    return stats


def teacher_stats_for(
    given: TeacherStats | None,
    teacher: nn.Module,
    data: TrainingImages,
    classes: Sequence[int],
    *,
    device: torch.device,
    progress: bool,
) -> TeacherStats:
    """``given`` (the ``teacher_stats`` stage's output), checked against ``data`` for
    ``classes``; or, when a method is called without it (library use, tests), computed now
    for ``classes`` at the default batch size."""
    if given is None:
        return compute_teacher_stats(teacher, data, classes, device=device, progress=progress)
    given.check(data, classes)
    return given
