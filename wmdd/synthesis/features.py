r"""Penultimate teacher features :math:`\phi(x) \in \mathbb{R}^D` of real images.

:math:`\phi` is ``model.forward_features`` (global-average-pooled for ResNets, flattened conv
features for ConvNets; see :mod:`wmdd.models.registry`), computed in eval mode (BN uses running
statistics) without gradients, batch by batch. Used by WMDD (barycenters, the MMD ablation),
herding and DM's teacher-feature variant.

Preprocessing is the evaluation one: the prepared images are already resized and centre-cropped
to the working resolution by the ``prepare`` stage (the paper's Resize + CenterCrop), so the only
step left is the normalisation ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmdd.data.prepared import TrainingImages

__all__ = ["class_features", "extract_features"]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    normalize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``model.forward_features`` of every image, in eval mode, without gradients.

    The model's train/eval mode is restored afterwards.

    Args:
        model: A model of :mod:`wmdd.models.registry` (has ``forward_features``), on ``device``.
        images: (N, C, H, W): uint8 (then ``normalize`` is required) or normalised float.
        batch_size: Images per forward pass.
        device: Where batches are moved.
        normalize: Applied to each batch on ``device`` (e.g. ``data.normalize``).

    Returns:
        float32 CPU features, shape (N, D).

    Raises:
        ValueError: On uint8 images without ``normalize``, bad shapes or ``batch_size < 1``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8 and normalize is None:
        raise ValueError("uint8 images need a `normalize` callable (e.g. data.normalize)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    forward_features = cast(Callable[[Tensor], Tensor], model.forward_features)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        x = normalize(x) if normalize is not None else x
        chunks.append(forward_features(x).float().cpu())  # (b, D)
    model.train(was_training)
    if not chunks:
        raise ValueError("extract_features: no images")
    return torch.cat(chunks)  # (N, D)


def class_features(
    model: nn.Module,
    data: TrainingImages,
    classes: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> list[Tensor]:
    """Features of every training image of each class, in dataset order.

    Returns:
        One float32 CPU tensor (n_c, D) per class of ``classes``, in that order.
    """
    return [
        extract_features(
            model,
            data.train_of_class(c),
            batch_size=batch_size,
            device=device,
            normalize=data.normalize,
        )
        for c in tqdm(list(classes), desc="class features", disable=not progress)
    ]
