"""Seeded, batched, differentiable image augmentations shared by the teacher recipe, the
synthesis loop and the relabel protocol.

Every random draw takes an explicit ``torch.Generator``: parameters are *sampled* by one
function and *applied* by another, so the relabel protocol can store the parameters and
replay them exactly, and the synthesis loop can draw one crop for a whole batch.

``resized_crops`` performs per-image crop-and-resize in one call with
``torchvision.ops.roi_align`` (bilinear, with adaptive area sampling when shrinking, which
plays the role of torchvision's antialiased resize); it is differentiable with respect to
the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator,
    attempts: int = 10,
) -> Tensor:
    """RandomResizedCrop boxes (torchvision's sampling rule), one per image.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to ``attempts`` tries per
    image, then the central crop clipped to ``ratio`` (as torchvision does).

    Returns:
        (n, 4) int64 boxes ``(top, left, h, w)``.
    """
    boxes = torch.empty(n, 4, dtype=torch.long)
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(n):
        u = torch.rand(attempts, 2, generator=generator, dtype=torch.float64)
        for a in range(attempts):
            target = area * (scale[0] + (scale[1] - scale[0]) * float(u[a, 0]))
            aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(u[a, 1]))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                boxes[k] = torch.tensor([top, left, h, w])
                break
        else:
            boxes[k] = torch.tensor(_central_box(height, width, ratio))
    return boxes


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crops ``boxes[i]`` out of ``images[i]`` and resizes it to ``size`` x ``size``.

    Args:
        images: (N, C, H, W) float.
        boxes: (N, 4) ``(top, left, h, w)`` in pixels.
        size: output side.

    Returns:
        (N, C, size, size), differentiable with respect to ``images``.
    """
    b = boxes.to(device=images.device, dtype=images.dtype)
    top, left, h, w = b.unbind(1)
    index = torch.arange(len(images), device=images.device, dtype=images.dtype)
    rois = torch.stack([index, left, top, left + w, top + h], dim=1)  # (N, 5) x1 y1 x2 y2
    from torchvision.ops import roi_align  # imported here: it pulls in torch._dynamo (~3 s)

    return roi_align(
        images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )


def apply_flips(images: Tensor, flips: Tensor) -> Tensor:
    """Horizontally flips ``images[i]`` where ``flips[i]`` is true. (N, C, H, W)."""
    mask = flips.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def sample_flips(n: int, *, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """(n,) bool: flip each image with probability ``p``."""
    return torch.rand(n, generator=generator) < p


@dataclass(frozen=True)
class CutMixParams:
    """One CutMix draw for a batch: a box pasted from ``perm``-shuffled images."""

    lam: float  # the Beta draw (fraction of the image kept before clipping the box)
    box: tuple[int, int, int, int]  # (y1, y2, x1, x2), the pasted region
    perm: Tensor  # (b,) int64, source image of the pasted region


def sample_cutmix(
    batch_size: int, height: int, width: int, *, alpha: float, generator: torch.Generator
) -> CutMixParams:
    """CutMix parameters (Yun et al. 2019): lambda ~ Beta(alpha, alpha), one box and one
    permutation per batch. The box has sides ``sqrt(1 - lambda)`` of the image, centred at a
    uniform pixel and clipped to the image."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    perm = torch.randperm(batch_size, generator=generator)
    return CutMixParams(lam=lam, box=(y1, y2, x1, x2), perm=perm)


def apply_cutmix(images: Tensor, params: CutMixParams) -> Tensor:
    """Pastes the box of ``images[perm]`` into ``images``. (b, C, H, W) -> same."""
    y1, y2, x1, x2 = params.box
    out = images.clone()
    out[:, :, y1:y2, x1:x2] = images[params.perm.to(images.device), :, y1:y2, x1:x2]
    return out


def random_roll(
    images: Tensor, *, max_shift: tuple[int, int], generator: torch.Generator
) -> Tensor:
    """Wrap-around jitter: ``torch.roll`` the whole batch by one random (dy, dx).

    ``dy``, ``dx`` are uniform integers in ``[lo, hi]`` with ``(lo, hi) = max_shift``
    (``[0, 32]`` at 224 px and ``[-4, 4]`` at 64 px in the published code).
    """
    lo, hi = max_shift
    dy, dx = torch.randint(lo, hi + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def random_crop_flip(
    x: Tensor, *, crop_scale: tuple[float, float], flip: bool, generator: torch.Generator
) -> Tensor:
    """Per-image RandomResizedCrop (+ a per-image flip) at the input resolution: the
    teacher recipe's training views. (b, C, R, R) -> same."""
    res = x.shape[-1]
    boxes = sample_crop_boxes(len(x), res, res, scale=crop_scale, generator=generator)
    x = resized_crops(x, boxes, res)
    if flip:
        x = apply_flips(x, sample_flips(len(x), generator=generator))
    return x
