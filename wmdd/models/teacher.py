"""Teacher training and strict checkpoint I/O.

Recipe (the SRe2L / WMDD teachers: SGD 0.025, momentum 0.9, weight decay 1e-4 on weights
only, batch 32, 50 epochs at the published settings): SGD with momentum, learning rate
cosine-decayed per step to 0, RandomResizedCrop + horizontal flip per image, cross-entropy. A checkpoint carries its own config (model name, options, classes,
resolution, normalisation) so it can be rebuilt and loaded with ``strict=True``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wmdd.augment.views import random_crop_flip
from wmdd.checkpoint import Checkpointer, loop_state, restore_loop
from wmdd.config import ModelConfig, TeacherConfig, to_dict
from wmdd.data.lazy import LazySplitSet
from wmdd.data.prepared import PreparedData
from wmdd.models.accuracy import evaluate
from wmdd.models.optim import weight_decay_groups
from wmdd.models.pretrained import PretrainedInfo, load_pretrained
from wmdd.models.registry import create_model
from wmdd.utils import cosine_factor, generator, load_artifact, seeded_init

log = logging.getLogger(__name__)


def build_teacher(model_cfg: ModelConfig, data: PreparedData | LazySplitSet) -> nn.Module:
    return create_model(
        model_cfg.name,
        num_classes=data.num_classes,
        in_chans=data.channels,
        resolution=data.resolution,
        **model_cfg.kwargs,
    )


def train_teacher(
    cfg: TeacherConfig,
    data: PreparedData,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Trains the teacher from scratch by ``cfg``'s recipe.

    ``on_epoch`` receives each epoch's ``{epoch, loss, val_top1, lr}`` as soon as it ends
    (the teacher stage logs it to MLflow, so a long run can be followed in the UI).
    ``checkpoint`` saves the whole training state at epoch ends and resumes from it: a
    resumed run gives the same weights, bit for bit, as an uninterrupted one.

    Returns:
        The model (eval mode) and a per-epoch history ``[{epoch, loss, val_top1, lr}]``.
    """
    with seeded_init(seed):
        model = build_teacher(cfg.model, data).to(device)
    opt = torch.optim.SGD(
        weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum
    )
    n = len(data.train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total))
    gen = generator(seed, "teacher-data")
    # On a GPU, batches are gathered from pinned host memory and copied asynchronously;
    # normalisation and augmentation then run on the device (same ops, same order as on CPU).
    train_x = data.train_x.pin_memory() if device.type == "cuda" else data.train_x
    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        restore_loop(state, model=model, optimizer=opt, scheduler=sched, generator=gen)
        history, start_epoch = state["history"], state["epoch"]
    bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc="teacher",
        unit="epoch",
        disable=not progress,
        initial=start_epoch,
        total=cfg.epochs,
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = data.normalize(train_x[idx].to(device, non_blocking=True))
            x = random_crop_flip(x, crop_scale=cfg.crop_scale, flip=cfg.flip, generator=gen)
            loss = F.cross_entropy(model(x), data.train_y[idx].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher: non-finite loss {loss.item()} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        acc = evaluate(
            model, data.val_x, data.val_y, batch_size=256, device=device, normalize=data.normalize
        )
        history.append(
            {
                "epoch": epoch + 1,
                "loss": running / n,
                "val_top1": acc.top1,
                "lr": sched.get_last_lr()[0],
            }
        )
        bar.set_postfix(loss=f"{running / n:.3f}", val_top1=f"{acc.top1:.1f}")
        if checkpoint is not None:
            checkpoint.step(
                functools.partial(
                    loop_state,
                    f"epoch {epoch + 1} of {cfg.epochs}",
                    model=model,
                    optimizer=opt,
                    scheduler=sched,
                    generator=gen,
                    epoch=epoch + 1,
                    history=history,
                )
            )
        if on_epoch is not None:
            on_epoch(history[-1])
    model.eval()
    return model, history


def pretrained_teacher(
    cfg: TeacherConfig, data: PreparedData | LazySplitSet, *, device: torch.device
) -> tuple[nn.Module, PretrainedInfo]:
    """Builds ``cfg.model`` for ``data`` and loads ``cfg.pretrained`` into it strictly.

    The classifier must match the dataset's classes (ImageNet-1K's 1000, in the sorted-wnid
    order torchvision's weights use); a mismatch is an error naming the keys.
    """
    model = build_teacher(cfg.model, data)
    info = load_pretrained(
        cfg.pretrained, model, weights_dir=Path(cfg.pretrained_dir) if cfg.pretrained_dir else None
    )
    model.to(device).eval()
    return model, info


def check_teacher_source(
    cfg: TeacherConfig, data: PreparedData | LazySplitSet, profile: str
) -> None:
    """A lazily prepared dataset (ImageNet-1K) has its teacher loaded, not trained here."""
    if isinstance(data, LazySplitSet) and not cfg.pretrained:
        raise ValueError(
            f"datasets.{profile}.teacher.pretrained: {data.name} is prepared lazily and its "
            "teacher is loaded, not trained here; set e.g. 'torchvision:resnet18.IMAGENET1K_V1'"
        )


def obtain_teacher(
    cfg: TeacherConfig,
    data: PreparedData | LazySplitSet,
    *,
    profile: str,
    seed: int,
    device: torch.device,
    progress: bool = True,
    log_epoch: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[nn.Module, dict, list[dict]]:
    """The profile's teacher: ``cfg.pretrained`` loaded strictly, or trained by the recipe.

    Returns the model (eval mode), what the checkpoint should record about its origin
    (``pretrained`` spec and weight-file SHA-256; empty for a trained teacher) and the
    training history (``[{epoch, loss, val_top1, lr}]``; empty for a loaded teacher).
    """
    check_teacher_source(cfg, data, profile)
    if cfg.pretrained:
        model, info = pretrained_teacher(cfg, data, device=device)
        log.info("loaded %s from %s (sha256 %s)", info.spec, info.path, info.sha256)
        return model, {"pretrained": info.spec, "pretrained_sha256": info.sha256}, []

    def on_epoch(h: dict) -> None:
        log.info("epoch %d: loss %.4f, val top-1 %.2f", h["epoch"], h["loss"], h["val_top1"])
        if log_epoch is not None:
            log_epoch(h)

    assert isinstance(data, PreparedData)  # lazy data was refused above
    model, history = train_teacher(
        cfg,
        data,
        seed=seed,
        device=device,
        progress=progress,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
    )
    return model, {}, history


def save_teacher(
    model: nn.Module,
    path: Path,
    *,
    model_cfg: ModelConfig,
    data: PreparedData | LazySplitSet,
    extra: dict,
) -> None:
    """Saves weights with everything needed to rebuild the model strictly."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "model": to_dict(model_cfg),
            "num_classes": data.num_classes,
            "in_chans": data.channels,
            "resolution": data.resolution,
            "classes": data.classes,
            "mean": list(data.mean),
            "std": list(data.std),
            **extra,
        },
        path,
    )


TEACHER_KEYS = ("state_dict", "model", "num_classes", "in_chans", "resolution")


def load_teacher(path: str | Path, *, device: torch.device) -> nn.Module:
    """Rebuilds the teacher from its checkpoint and loads it with ``strict=True``.

    Returns the model in eval mode with frozen parameters.
    """
    ckpt = load_artifact(path, "teacher checkpoint", keys=TEACHER_KEYS, stage="teacher")
    cfg = ckpt["model"]
    model = create_model(
        cfg["name"],
        num_classes=ckpt["num_classes"],
        in_chans=ckpt["in_chans"],
        resolution=ckpt["resolution"],
        **cfg["kwargs"],
    )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_checkpoint_info(path: str | Path) -> dict:
    """Everything in a teacher checkpoint except the weights."""
    ckpt = load_artifact(path, "teacher checkpoint", keys=TEACHER_KEYS, stage="teacher")
    return {k: v for k, v in ckpt.items() if k != "state_dict"}
