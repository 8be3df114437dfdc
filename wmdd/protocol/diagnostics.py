"""What the teacher makes of a distilled set, before any student is trained on it.

Every method's set is relabelled by the same teacher, so a set the teacher does not
recognise gets soft labels that teach the wrong classes, whatever the method optimised.
These statistics make that visible per cell (the ``diagnose`` stage logs them and the report
shows them beside the accuracies):

* ``teacher_agreement`` — % of the set's images whose teacher top-1 (clean image, eval
  mode) is the image's own label;
* ``teacher_label_prob`` — mean teacher probability of the image's own label;
* ``teacher_confidence`` — mean teacher probability of its top class;
* ``pixels_outside`` — % of pixel values outside the valid [0, 1] range once mapped back
  from the normalised space, by more than half a grey level (``PIXEL_TOLERANCE``: a real
  image or a clamped one maps back to [0, 1] only up to float rounding). Methods that
  optimise pixels without a clamp, such as DM, drift there; the protocol's augmentations
  never clamp either;
* ``pixel_min`` / ``pixel_max`` — the extreme pixel values in [0, 1] units.

For a set synthesised towards feature targets (WMDD's barycenter points, kept in its
``aux.pt``), :func:`barycenter_diagnostics` separates the two ways such a set can fail:

* ``barycenter_agreement`` — % of the target points the teacher's classifier head assigns to
  their own class (low: the targets themselves are ambiguous);
* ``feature_distance`` — median over images of the distance from the image's clean teacher
  feature to its own point, relative to the point's norm (high: the synthesis did not reach
  its target, e.g. too few iterations or a BN term that dominates the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from wmdd.data.prepared import denormalize_pixels

PIXEL_TOLERANCE = 0.5 / 255  # half a grey level of an 8-bit image


@torch.no_grad()
def set_diagnostics(
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The statistics of the module docstring for one set.

    Args:
        teacher: The profile's teacher (put in eval mode here).
        images: (N, C, H, W) float images in the dataset's normalised space.
        labels: (N,) int64 class labels.
        mean: Per-channel normalisation mean of [0, 1] pixels.
        std: Per-channel normalisation std.
        batch_size: Images per teacher forward pass.
        device: Where the teacher runs.

    Returns:
        ``teacher_agreement``, ``teacher_label_prob``, ``teacher_confidence``,
        ``pixels_outside`` (percentages / probabilities as documented above),
        ``pixel_min``, ``pixel_max`` and ``images`` (the set size).
    """
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"expected a non-empty set of images (N, C, H, W) with labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"mean/std have {len(mean)}/{len(std)} channels, the images {images.shape[1]}"
        )
    teacher.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, torch.float32)
        probs.append(teacher(batch).float().softmax(dim=1).cpu())
    p = torch.cat(probs)
    labels = labels.long().cpu()
    pixels = denormalize_pixels(images.float().cpu(), mean, std)
    outside = (pixels < -PIXEL_TOLERANCE) | (pixels > 1 + PIXEL_TOLERANCE)
    return {
        "teacher_agreement": 100.0 * (p.argmax(dim=1) == labels).float().mean().item(),
        "teacher_label_prob": p.gather(1, labels[:, None]).mean().item(),
        "teacher_confidence": p.max(dim=1).values.mean().item(),
        "pixels_outside": 100.0 * outside.float().mean().item(),
        "pixel_min": pixels.min().item(),
        "pixel_max": pixels.max().item(),
        "images": float(len(images)),
    }


@torch.no_grad()
def barycenter_diagnostics(
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    barycenters: Tensor,
    classes: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The teacher's verdict on a set's feature targets and how close the images came.

    Args:
        teacher: The profile's teacher (``forward_features`` / ``forward_head``).
        images: (N, C, H, W) normalised images ordered by (class, slot), k per class.
        labels: (N,) int64 class labels.
        barycenters: (C_range, k, D) the target points, row r of class ``classes[r]``.
        classes: (C_range,) the classes of the rows.
        batch_size: Images per teacher forward pass.
        device: Where the teacher runs.

    Returns:
        ``barycenter_agreement`` (%) and ``feature_distance`` (median relative distance).
    """
    teacher.eval()
    forward_features = cast(Callable[[Tensor], Tensor], teacher.forward_features)
    forward_head = cast(Callable[[Tensor], Tensor], teacher.forward_head)
    rows, k, dim = barycenters.shape
    if len(images) != rows * k:
        raise ValueError(f"{len(images)} images for {rows} classes x {k} barycenter points")
    points = barycenters.reshape(rows * k, dim).to(device, torch.float32)  # (N, D)
    point_class = classes.long().repeat_interleave(k)  # (N,)
    head = forward_head(points).float().argmax(dim=1).cpu()
    feats = torch.cat([
        forward_features(images[i : i + batch_size].to(device, torch.float32)).float()
        for i in range(0, len(images), batch_size)
    ])  # fmt: skip
    if not torch.equal(point_class, labels.long().cpu()):
        raise ValueError("the set is not ordered by (class, slot) as its barycenter points")
    distance = (feats - points).norm(dim=1) / points.norm(dim=1).clamp_min(1e-12)
    return {
        "barycenter_agreement": 100.0 * (head == point_class).float().mean().item(),
        "feature_distance": distance.median().item(),
    }
