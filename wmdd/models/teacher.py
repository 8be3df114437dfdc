"""Teacher training, evaluation and strict checkpoint I/O.

Recipe (PROTOCOL.md, the SRe2L/WMDD teachers): SGD with momentum and weight decay,
learning rate cosine-decayed per step to 0, RandomResizedCrop + horizontal flip per image,
cross-entropy. A checkpoint carries its own config (model name, options, classes,
resolution, normalisation) so it can be rebuilt and loaded with ``strict=True``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wmdd.augment.views import apply_flips, resized_crops, sample_crop_boxes, sample_flips
from wmdd.config import ModelConfig, TeacherConfig, to_dict
from wmdd.data.lazy import LazySplitSet
from wmdd.data.prepared import PreparedData
from wmdd.models.pretrained import PretrainedInfo, load_pretrained
from wmdd.models.registry import create_model
from wmdd.utils import generator, seeded_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    normalize=None,
) -> Accuracy:
    """Top-1 / top-5 accuracy (%) of ``model`` (put in eval mode) on a whole split.

    Args:
        images: (N, C, H, W), uint8 (then ``normalize`` maps batches) or normalised float.
        labels: (N,) int64.
        normalize: optional callable applied to each batch (uint8 -> normalised float).
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        x = normalize(x) if normalize is not None else x
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (b, k)
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
    model.train(was_training)
    n = len(images)
    return Accuracy(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n)


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, *, device: torch.device, normalize) -> Accuracy:
    """Top-1 / top-5 (%) over a DataLoader of ``(x uint8, y)`` batches (lazy datasets)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    for x, y in tqdm(loader, desc="evaluate", unit="batch", disable=None):
        x = normalize(x.to(device, non_blocking=True))
        y = y.to(device)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_loader: the loader yielded no images")
    return Accuracy(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n)


def augment_batch(
    x: Tensor, *, crop_scale: tuple[float, float], flip: bool, gen: torch.Generator
) -> Tensor:
    """Per-image RandomResizedCrop (+ flip) at the input resolution. (b, C, R, R)."""
    res = x.shape[-1]
    boxes = sample_crop_boxes(len(x), res, res, scale=crop_scale, generator=gen)
    x = resized_crops(x, boxes, res)
    if flip:
        x = apply_flips(x, sample_flips(len(x), generator=gen))
    return x


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
) -> tuple[nn.Module, list[dict]]:
    """Trains the teacher from scratch by ``cfg``'s recipe.

    ``on_epoch`` receives each epoch's ``{epoch, loss, val_top1, lr}`` as soon as it ends
    (the teacher stage logs it to MLflow, so a long run can be followed in the UI).

    Returns:
        The model (eval mode) and a per-epoch history ``[{epoch, loss, val_top1, lr}]``.
    """
    with seeded_init(seed):
        model = build_teacher(cfg.model, data).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    n = len(data.train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = generator(seed, "teacher-data")
    # On a GPU, batches are gathered from pinned host memory and copied asynchronously;
    # normalisation and augmentation then run on the device (same ops, same order as on CPU).
    train_x = data.train_x.pin_memory() if device.type == "cuda" else data.train_x
    history = []
    bar = tqdm(range(cfg.epochs), desc="teacher", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = data.normalize(train_x[idx].to(device, non_blocking=True))
            x = augment_batch(x, crop_scale=cfg.crop_scale, flip=cfg.flip, gen=gen)
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


def load_teacher(path: str | Path, *, device: torch.device) -> nn.Module:
    """Rebuilds the teacher from its checkpoint and loads it with ``strict=True``.

    Returns the model in eval mode with frozen parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found (run the teacher stage)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt.items() if k != "state_dict"}
