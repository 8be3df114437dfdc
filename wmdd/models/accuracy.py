"""Top-1 / top-5 accuracy of a model on a whole split: cached tensors or a lazy loader.

:func:`split_validator` is what every stage that scores a model (teacher, evaluate) uses,
so cached datasets and lazily decoded ImageNet-1K are scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from wmdd.data.lazy import LazySplitSet, make_loader
from wmdd.data.prepared import PreparedData


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent


Validate = Callable[[nn.Module, int], Accuracy]  # (model, batch size) -> accuracy on val


def topk_correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of one batch; top-5 is top-K for K < 5 classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, k)
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def _score(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    normalize: Callable[[Tensor], Tensor] | None,
) -> Accuracy:
    """Accuracy (%) of ``model`` (put in eval mode, then restored) over ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        x = normalize(x) if normalize is not None else x
        y = y.to(device)
        c1, c5 = topk_correct(model(x), y)
        correct1, correct5, n = correct1 + c1, correct5 + c5, n + len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("accuracy: no images to score")
    return Accuracy(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n)


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    normalize=None,
) -> Accuracy:
    """Top-1 / top-5 accuracy (%) of ``model`` on a whole split held as tensors.

    Args:
        images: (N, C, H, W), uint8 (then ``normalize`` maps batches) or normalised float.
        labels: (N,) int64.
        normalize: optional callable applied to each batch (uint8 -> normalised float).
    """
    batches = (
        (images[start : start + batch_size], labels[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    )
    return _score(model, batches, device=device, normalize=normalize)


def evaluate_loader(model: nn.Module, loader, *, device: torch.device, normalize) -> Accuracy:
    """Top-1 / top-5 (%) over a DataLoader of ``(x uint8, y)`` batches (lazy datasets)."""
    batches = tqdm(loader, desc="evaluate", unit="batch", disable=None)
    return _score(model, batches, device=device, normalize=normalize)


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
