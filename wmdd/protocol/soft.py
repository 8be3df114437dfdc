"""The soft-label relabel + evaluation protocol, the suite's headline. It never knows which
method produced a synthetic set.

Soft-label protocol (primary; the SRe2L / WMDD lineage):

* Relabel: for each epoch e, a seeded permutation of the synthetic set, split into batches
  of ``b = min(batch_size, N)`` images (for 10-class datasets with IPC < 10 this is the
  published ``b = 10 * IPC``). Per image a RandomResizedCrop box and a flip, per batch one
  CutMix draw (lambda ~ Beta(1, 1), one box, one permutation). The teacher's logits on the
  mixed batch are the soft labels; the temperature is applied at training time.
* Two relabel modes give identical targets for the same seed: ``stored`` precomputes and
  stores the explicit index order, crop boxes, flips, CutMix parameters and the logits of
  every epoch/batch (what the papers did), and training replays them; ``online`` draws the
  same parameters from the same seed and runs the teacher during training. Logits are
  rounded to ``label_dtype`` in both modes, which is what makes them bit-identical.
* Student: the dataset's evaluation model from scratch (init seeded by the eval seed),
  ``KL(softmax(t / T) || softmax(s / T))`` summed over classes and averaged over the batch
  (T = 20, no T^2 factor unless ``t2_factor``), AdamW (weight decay on ndim > 1 parameters
  only), cosine decay per epoch to 0 (``schedule_epochs``: a longer cosine, stopped part-way). Validation on the full validation split; the headline
  is the final epoch's top-1, with top-5 and the best epoch's top-1 recorded separately.

The eval seed drives the student init, the relabel views and the data order; the derived
seeds do not depend on the method, so every method sees the same random views
(common random numbers make the method comparison paired).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wmdd.augment.views import (
    CutMixParams,
    apply_cutmix,
    apply_flips,
    resized_crops,
    sample_crop_boxes,
    sample_cutmix,
    sample_flips,
)
from wmdd.checkpoint import Checkpointer, loop_state, restore_loop
from wmdd.config import SoftProtocolConfig
from wmdd.distributed import Ranks, data_parallel
from wmdd.models.accuracy import Accuracy
from wmdd.models.optim import weight_decay_groups
from wmdd.utils import autocast, cosine_factor, generator, load_artifact


@dataclass(frozen=True)
class BatchPlan:
    """Everything random about one relabel batch."""

    indices: Tensor  # (b,) int64, images of the synthetic set in this batch
    boxes: Tensor  # (b, 4) int64 crop boxes (top, left, h, w)
    flips: Tensor  # (b,) bool
    cutmix: CutMixParams  # one CutMix draw for the batch


def batch_size_for(cfg: SoftProtocolConfig, n_images: int) -> int:
    return min(cfg.batch_size, n_images)


def plan_epoch(
    n_images: int, resolution: int, cfg: SoftProtocolConfig, *, seed: int, epoch: int
) -> list[BatchPlan]:
    """The relabel views of one epoch, drawn from ``(seed, epoch)`` alone."""
    gen = generator(seed, "relabel", epoch)
    b = batch_size_for(cfg, n_images)
    order = torch.randperm(n_images, generator=gen)
    plans = []
    for start in range(0, n_images, b):
        idx = order[start : start + b]
        boxes = sample_crop_boxes(
            len(idx), resolution, resolution, scale=cfg.crop_scale, generator=gen
        )
        flips = sample_flips(len(idx), generator=gen, p=0.5 if cfg.flip else 0.0)
        cutmix = sample_cutmix(
            len(idx), resolution, resolution, alpha=cfg.cutmix_alpha, generator=gen
        )
        plans.append(BatchPlan(idx, boxes, flips, cutmix))
    return plans


def make_views(images: Tensor, plan: BatchPlan) -> Tensor:
    """The student/teacher input of one batch: crops, flips, then CutMix. (b, C, R, R)."""
    x = images[plan.indices.to(images.device)]
    x = resized_crops(x, plan.boxes, images.shape[-1])
    x = apply_flips(x, plan.flips)
    return apply_cutmix(x, plan.cutmix)


def _dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "float32": torch.float32}[name]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, views: Tensor, dtype: torch.dtype) -> Tensor:
    """Soft labels: the teacher's logits, rounded to the storage dtype. (b, K).

    Raises ValueError on a teacher in training mode: its BatchNorm would label each view
    with the batch's own statistics (labels then depend on the batch's other views) and
    overwrite its running statistics, so stored and online labels would disagree."""
    if teacher.training:
        raise ValueError(
            "relabelling needs the teacher in eval mode (BatchNorm on its running statistics): "
            "call teacher.eval() first"
        )
    return teacher(views).to(dtype)


class OnlineLabels:
    """Relabel mode ``online``: views drawn from the seed, the teacher runs during training."""

    def __init__(self, teacher: nn.Module, cfg: SoftProtocolConfig, *, seed: int):
        self.teacher, self.cfg, self.seed = teacher, cfg, seed

    def epoch(self, epoch: int, images: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields ``(views, targets)`` for every batch of ``epoch``."""
        for views, targets, _ in self.batches(epoch, images):
            yield views, targets

    def batches(self, epoch: int, images: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yields ``(views, targets, indices)``: :meth:`epoch` with each batch's images'
        indices into the set (per-image weights follow them)."""
        res = images.shape[-1]
        for plan in plan_epoch(len(images), res, self.cfg, seed=self.seed, epoch=epoch):
            views = make_views(images, plan)
            targets = teacher_logits(self.teacher, views, _dtype(self.cfg.label_dtype))
            yield views, targets, plan.indices


@dataclass
class StoredLabels:
    """Relabel mode ``stored``: every epoch's parameters and fp16 logits, replayed exactly.

    Tensors are stacked over epochs ``E``; ``N`` synthetic images; batches are consecutive
    slices of ``order`` of size ``batch_size``.
    """

    seed: int  # the derived relabel seed (for provenance)
    batch_size: int  # b
    order: Tensor  # (E, N) int64, explicit index order per epoch
    boxes: Tensor  # (E, N, 4) int32 crop boxes, aligned with ``order``
    flips: Tensor  # (E, N) bool, aligned with ``order``
    cutmix_lam: Tensor  # (E, B) float64 Beta draws, B = batches per epoch
    cutmix_box: Tensor  # (E, B, 4) int32 (y1, y2, x1, x2)
    cutmix_perm: Tensor  # (E, N) int64, within-batch permutations, concatenated
    logits: Tensor  # (E, N, K) soft labels in the storage dtype, aligned with ``order``

    @classmethod
    def compute(
        cls,
        teacher: nn.Module,
        images: Tensor,
        cfg: SoftProtocolConfig,
        *,
        seed: int,
        progress: bool = True,
    ) -> StoredLabels:
        """Draws every epoch's views and stores them with the teacher's logits."""
        res = images.shape[-1]
        fields: dict[str, list] = {
            k: [] for k in ("order", "boxes", "flips", "lam", "cbox", "perm", "logits")
        }
        for e in tqdm(range(cfg.epochs), desc="relabel", unit="epoch", disable=not progress):
            plans = plan_epoch(len(images), res, cfg, seed=seed, epoch=e)
            logits = [
                teacher_logits(teacher, make_views(images, p), _dtype(cfg.label_dtype))
                for p in plans
            ]
            fields["order"].append(torch.cat([p.indices for p in plans]))
            fields["boxes"].append(torch.cat([p.boxes for p in plans]).int())
            fields["flips"].append(torch.cat([p.flips for p in plans]))
            fields["lam"].append(torch.tensor([p.cutmix.lam for p in plans], dtype=torch.float64))
            fields["cbox"].append(torch.tensor([p.cutmix.box for p in plans], dtype=torch.int32))
            fields["perm"].append(torch.cat([p.cutmix.perm for p in plans]))
            fields["logits"].append(torch.cat(logits).cpu())
        s = {k: torch.stack(v) for k, v in fields.items()}
        return cls(
            seed,
            batch_size_for(cfg, len(images)),
            s["order"],
            s["boxes"],
            s["flips"],
            s["lam"],
            s["cbox"],
            s["perm"],
            s["logits"],
        )

    @property
    def epochs(self) -> int:
        return int(self.order.shape[0])

    def plans(self, epoch: int) -> Iterator[tuple[BatchPlan, Tensor]]:
        """The stored plan and logits of every batch of ``epoch``."""
        n, b = self.order.shape[1], self.batch_size
        for bi, start in enumerate(range(0, n, b)):
            sl = slice(start, start + b)
            cutmix = CutMixParams(
                float(self.cutmix_lam[epoch, bi]),
                cast(tuple[int, int, int, int], tuple(int(v) for v in self.cutmix_box[epoch, bi])),
                self.cutmix_perm[epoch, sl],
            )
            plan = BatchPlan(
                self.order[epoch, sl], self.boxes[epoch, sl].long(), self.flips[epoch, sl], cutmix
            )
            yield plan, self.logits[epoch, sl]

    def epoch(self, epoch: int, images: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields the replayed ``(views, targets)`` for every batch of ``epoch``."""
        for views, targets, _ in self.batches(epoch, images):
            yield views, targets

    def batches(self, epoch: int, images: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yields ``(views, targets, indices)``: :meth:`epoch` with each batch's images'
        indices into the set."""
        for plan, logits in self.plans(epoch):
            yield make_views(images, plan), logits.to(images.device), plan.indices

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: Path) -> StoredLabels:
        """Reads a ``seed<s>.pt`` written by :meth:`save`; errors name the file."""
        keys = tuple(cls.__dataclass_fields__)
        state = load_artifact(path, "stored soft-label file", keys=keys, stage="relabel")
        return cls(**{k: state[k] for k in keys})

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in self.state_dict().values()
            if isinstance(t, Tensor)
        )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    t2_factor: bool = False,
    weights: Tensor | None = None,
) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` summed over classes, mean over the batch; with
    ``weights`` (b,), each view's KL times its weight before the mean (WMDD's weighted
    barycenter variant; ``None`` is the unweighted loss, computed as before)."""
    student_log = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    if weights is None:
        loss = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
    else:
        per_view = F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(1)
        loss = (weights.to(per_view) * per_view).mean()
    return loss * temperature**2 if t2_factor else loss


def train_student_soft(
    *,
    student: nn.Module,
    labels: StoredLabels | OnlineLabels,
    images: Tensor,
    validate: Callable[[nn.Module, int], Accuracy],
    cfg: SoftProtocolConfig,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    ranks: Ranks | None = None,
    sync_bn: bool = False,
    weights: Tensor | None = None,
) -> dict:
    """Trains ``student`` on relabelled views of ``images``; validates on the full split.

    Args:
        images: (N, C, R, R) synthetic set in normalised space, on ``device``.
        weights: Optional (N,) per-image weights of the set (:attr:`SyntheticSet.weights`):
            each view's KD term is weighted by its image's weight (the image whose crop a
            CutMix patch is pasted into). ``None``: every view weighs 1.
        validate: ``validate(model, batch_size)`` scores a model on the full validation
            split (:func:`wmdd.models.accuracy.split_validator`: cached tensors or a lazy loader).
        on_epoch: Receives each validated epoch's ``{epoch, loss, top1, top5}``.
        checkpoint: Saves the training state at epoch ends and resumes from it (the views of
            an epoch depend on the seed and the epoch alone, so a resumed run is identical).
        ranks: Train data-parallel (:mod:`wmdd.distributed`): this rank's part of
            every batch, gradients averaged by DDP; only rank 0 validates, saves checkpoints
            and returns the result (other ranks return ``{}``).
        sync_bn: With ``ranks``, BatchNorm statistics over the whole batch (CUDA only).

    Returns:
        ``{"top1", "top5", "best_top1", "best_epoch", "history": [{epoch, loss, top1, top5}]}``.
    """
    student.to(device).train()
    opt = torch.optim.AdamW(weight_decay_groups(student, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: cosine_factor(e, cfg.schedule_epochs or cfg.epochs)
    )
    history: list[dict] = []
    start = 0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        restore_loop(state, model=student, optimizer=opt, scheduler=sched)
        history, start = state["history"], state["epoch"]
    main = ranks is None or ranks.main
    model = student if ranks is None else data_parallel(student, ranks, device, sync_bn=sync_bn)
    bar = tqdm(
        range(start, cfg.epochs),
        desc="student",
        unit="epoch",
        disable=not progress or not main,
        initial=start,
        total=cfg.epochs,
    )
    for e in bar:
        model.train()
        total, count = 0.0, 0
        for views, targets, indices in labels.batches(e, images):
            w = None if weights is None else weights[indices.to(weights.device)]  # (b,)
            if ranks is not None:  # this rank's part of the protocol's batch
                part, scale = ranks.part(len(views)), ranks.scale(len(views))
                views, targets = views[part], targets[part]
                w = None if w is None else w[part]
            with autocast(cfg.precision, device):  # the student only: targets are made
                logits = model(views)
            loss = kd_loss(logits.float(), targets, cfg.temperature, cfg.t2_factor, w)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"student: non-finite loss at epoch {e}")
            opt.zero_grad(set_to_none=True)
            (loss if ranks is None else loss * scale).backward()
            opt.step()
            total, count = total + loss.item() * len(views), count + len(views)
        sched.step()
        if not main:
            continue
        if (e + 1) % cfg.eval_interval == 0 or e + 1 == cfg.epochs:
            acc = validate(student, cfg.eval_batch_size)
            history.append(
                {"epoch": e + 1, "loss": total / count, "top1": acc.top1, "top5": acc.top5}
            )
            bar.set_postfix(loss=f"{total / count:.3f}", top1=f"{acc.top1:.1f}")
            if on_epoch is not None:
                on_epoch(history[-1])
        if checkpoint is not None:
            checkpoint.step(
                functools.partial(
                    loop_state,
                    f"epoch {e + 1} of {cfg.epochs}",
                    model=student,
                    optimizer=opt,
                    scheduler=sched,
                    epoch=e + 1,
                    history=history,
                )
            )
    return student_result(history) if main else {}


def student_result(history: list[dict]) -> dict:
    """The protocol's numbers from a student's validation history: the final epoch's top-1
    (the headline) and top-5, the best epoch's top-1 and that epoch."""
    best = max(history, key=lambda h: h["top1"])
    return {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "history": history,
    }
