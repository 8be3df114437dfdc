"""RDED: realistic and diverse dataset distillation by patch selection (Sun et al., CVPR 2024).

No optimisation. For each class :math:`c`:

1. draw ``candidates`` real training images of the class at random (all of them when the
   class has fewer);
2. take ``crops`` random-resized crops of each, square (aspect ratio 1), area fraction in
   ``crop_scale``, resized to the patch side :math:`s = R / f` (``f`` = ``factor``);
3. score every crop with the teacher: the *realism score*
   :math:`\\ell(x) = -\\log \\operatorname{softmax}(T(\\operatorname{pad}(x)))_c`, the
   cross-entropy of the true class, where :math:`\\operatorname{pad}` centres the patch in
   an :math:`R \\times R` canvas of zeros in normalised space (the dataset's mean colour),
   the teacher in eval mode;
4. keep each image's best crop (lowest score), rank the kept crops over the class (lowest
   first) and take the best :math:`n = \\text{ipc} \\cdot f^2`;
5. stitch: image :math:`t` of the class is an :math:`f \\times f` grid whose patch
   :math:`k` (row-major) is the ranked crop :math:`k \\cdot \\text{ipc} + t`, so the
   ``ipc`` best crops fill the first patch of every image, the next ``ipc`` the second,
   and so on. When :math:`R` is not a multiple of :math:`f` the first rows and columns are
   one pixel larger (nearest-neighbour resize of their crops).

Faithful to the official code (LINs-lab/RDED, ``synthesize/``) in each of these steps,
including the zero padding (not a resize) before scoring, softmax-then-log, the ranking
over the whole class and the patch order. Departures, all documented in the README
("RDED"):

* the draws are seeded (``seed`` and the class; the official code shuffles with Python's
  unseeded ``random``), so a set is reproducible and any class range equals that slice of
  a full run;
* the crop is resized with ``torchvision.ops.roi_align`` (bilinear with area sampling when
  shrinking, our stand-in for torchvision's antialiased resize, shared with every other
  crop in the suite);
* storage is lossless by default: the official code saves JPEGs (PIL quality 75, floored
  to 8 bits); ``jpeg_quality: 75`` reproduces that round trip, as for WMDD and SRe2L;
* the per-dataset ``factor``: the official scripts use 2 for the ImageNet subsets at 224
  (and 128) px and 1 for CIFAR (32 px) and Tiny-ImageNet (64 px); ``params.yaml`` follows
  the resolution (1 at 64 px and below, 2 above).

RDED's own evaluation (patch shuffling, online labels, its schedule) is not used: every
method goes through this suite's protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmdd.augment.views import resized_crops, sample_crop_boxes
from wmdd.data.prepared import TrainingImages
from wmdd.synthetic_set import SyntheticSet, jpeg_roundtrip
from wmdd.utils import generator


@dataclass(frozen=True)
class RDEDConfig:
    """RDED's settings (the official scripts' values, all datasets: 300 images, 5 crops)."""

    candidates: int = 300  # real images drawn per class (mipc); all when a class has fewer
    crops: int = 5  # random-resized crops per image (num_crop); the best one is kept
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of each crop
    factor: int = 2  # patches per side of a distilled image (2 at 224 px; 1 at <= 64 px)
    batch_size: int = 100  # crops per teacher forward (does not change the scores' order)
    jpeg_quality: int = 0  # 0 = lossless (default); 75 = the official code's JPEG files

    def __post_init__(self) -> None:
        for name in ("candidates", "crops", "factor", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale: expected 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 0 (off) or 1..100, got {self.jpeg_quality}")


def patch_sides(size: int, factor: int) -> list[int]:
    """The sides of the ``factor`` patch rows (or columns) of a ``size``-pixel image: the
    first ``size % factor`` are one pixel larger."""
    base, extra = divmod(size, factor)
    return [base + 1 if i < extra else base for i in range(factor)]


def stitch(crops: Tensor, factor: int, size: int) -> Tensor:
    """Stitches ranked crops into images of ``factor x factor`` patches.

    Args:
        crops: (ipc * factor^2, C, s, s), best first.
        factor: Patches per side.
        size: Side of the output images.

    Returns:
        (ipc, C, size, size): patch ``k`` (row-major) of image ``t`` is ``crops[k * ipc + t]``,
        resized (nearest neighbour) to its patch when the side does not divide evenly.
    """
    n = len(crops) // factor**2
    if n * factor**2 != len(crops):
        raise ValueError(f"stitch: {len(crops)} crops do not fill images of {factor}^2 patches")
    sides = patch_sides(size, factor)
    out = crops.new_zeros(n, crops.shape[1], size, size)
    k, top = 0, 0
    for h in sides:
        left = 0
        for w in sides:
            block = crops[k * n : (k + 1) * n]
            if block.shape[-2:] != (h, w):
                block = F.interpolate(block, size=(h, w), mode="nearest")
            out[:, :, top : top + h, left : left + w] = block
            left, k = left + w, k + 1
        top += h
    return out


@torch.no_grad()
def realism_scores(
    teacher: nn.Module, crops: Tensor, label: int, *, size: int, batch_size: int
) -> Tensor:
    """The teacher's cross-entropy of class ``label`` for each normalised crop, centred in a
    ``size``-pixel canvas of zeros: (N,) float32."""
    pad = size - crops.shape[-1]
    before = pad // 2
    scores = []
    for batch in crops.split(batch_size):
        x = F.pad(batch, (before, pad - before, before, pad - before))
        probs = teacher(x).float().softmax(dim=1)  # softmax, then log (the official order)
        scores.append(-probs[:, label].log())
    return torch.cat(scores)


def rded_class(
    teacher: nn.Module,
    data: TrainingImages,
    c: int,
    ipc: int,
    config: RDEDConfig,
    seed: int,
    device: torch.device,
    window: Literal["best", "median"] = "best",
) -> tuple[Tensor, Tensor, Tensor]:
    """One class: ``(images (ipc, C, R, R) normalised, the train position each patch was
    cropped from (ipc, f^2), the patches' realism scores (ipc, f^2))``; column ``k`` is
    patch ``k`` (row-major).

    ``window="best"`` keeps the most realistic crops (RDED); ``"median"`` the ``ipc * f^2``
    ranked crops centred on the median rank (FADRM's "medium" patches, our rule)."""
    size, factor = data.resolution, config.factor
    need = ipc * factor**2
    index = data.train_indices_of_class(c)  # (n_c,) train positions, dataset order
    if len(index) < need:
        raise ValueError(
            f"RDED at IPC {ipc} with factor {factor} needs {need} real images of class {c}; "
            f"it has {len(index)} (lower methods.rded.factor or the IPC)"
        )
    g = generator(seed, "rded", c)
    drawn = index[torch.randperm(len(index), generator=g)[: min(config.candidates, len(index))]]
    if len(drawn) < need:
        raise ValueError(
            f"RDED at IPC {ipc} with factor {factor} ranks the best {need} crops of "
            f"methods.rded.candidates = {config.candidates} images: raise it to at least {need}"
        )
    images = data.normalize(data.train_images(drawn)).to(device)  # (m, C, R, R)
    side = size // factor
    m, k = len(drawn), config.crops
    boxes = sample_crop_boxes(
        m * k, size, size, scale=config.crop_scale, ratio=(1.0, 1.0), generator=g
    ).view(k, m, 4)  # crop j of image i is boxes[j, i]
    crops = torch.cat([resized_crops(images, boxes[j], side) for j in range(k)])  # (k * m, ...)
    scores = realism_scores(teacher, crops, c, size=size, batch_size=config.batch_size).view(k, m)
    best, which = scores.min(dim=0)  # (m,) each image's best crop (the first among ties)
    order = torch.argsort(best, stable=True)  # lowest cross-entropy first
    first = 0 if window == "best" else (m - need) // 2
    rank = order[first : first + need]
    kept = crops.view(k, m, *crops.shape[1:])[which[rank], rank]  # (need, C, s, s)
    per_image = (factor**2, ipc)  # kept crop k * ipc + t is patch k of image t
    sources = drawn[rank.cpu()].view(per_image).T.contiguous()
    return stitch(kept, factor, size), sources, best[rank].cpu().view(per_image).T.contiguous()


def rded(
    *,
    teacher: nn.Module | None,
    data: TrainingImages,
    classes: Sequence[int],
    ipc: int,
    config: RDEDConfig,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> SyntheticSet:
    """Distils ``ipc`` stitched images per class by RDED (see the module docstring).

    Per class and seeded by ``(seed, class)``, so any class range equals that slice of a
    full run.

    Returns:
        Images (len(classes) * ipc, C, R, R) in normalised space, ordered by class, with
        ``aux["train_indices"]`` (N, f^2) (the train position each patch of each image was
        cropped from, row-major patches), ``aux["realism"]`` (N, f^2) (their scores) and
        ``aux["timings"]``.
    """
    if teacher is None:
        raise ValueError("RDED needs a teacher (it scores the crops)")
    if teacher.training:
        raise ValueError("RDED scores crops with the teacher in eval mode; got a training one")
    classes = list(classes)
    data.check_ipc(classes, ipc)
    start = time.perf_counter()
    images, labels, sources, realism = [], [], [], []
    for c in tqdm(classes, desc="rded", unit="class", disable=not progress):
        x, source, score = rded_class(teacher, data, c, ipc, config, seed, device)
        images.append(x.cpu())
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        sources.append(source)
        realism.append(score)
    timings = {"select": time.perf_counter() - start}
    out = torch.cat(images)
    if config.jpeg_quality:
        pixels = data.denormalize(out).clamp(0, 1)
        decoded = jpeg_roundtrip(pixels, quality=config.jpeg_quality)  # [0, 1], 8-bit values
        out = data.normalize(decoded.mul(255).round().to(torch.uint8))
    aux = {"train_indices": torch.cat(sources), "realism": torch.cat(realism), "timings": timings}
    return SyntheticSet(out.float(), torch.cat(labels), aux=aux)
