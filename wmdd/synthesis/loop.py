r"""The shared image-synthesis loop of WMDD (arXiv 2311.18531) and SRe2L (arXiv 2306.13092).

Synthetic images :math:`X` live in the dataset's *normalised* pixel space and are optimised in
independent batches :math:`\mathcal{B}` (each from scratch) to minimise a method-specific loss
:math:`L(\mathrm{aug}_t(X_\mathcal{B}), \mathcal{B})`:

.. math::

    X^{(0)}_{c,m} \sim \mathcal{N}(0, I), \qquad
    X^{(t+1)} = \operatorname{clamp}_{[lo, hi]}\big(\operatorname{Adam}_{\eta_t}(X^{(t)},
        \nabla_X L(\mathrm{aug}_t(X^{(t)}), \mathcal{B}))\big), \qquad
    \eta_t = \tfrac{1}{2}\, \eta\, \big(1 + \cos(\pi t / T)\big),

with Adam(betas=(0.5, 0.9), eps=1e-8), :math:`t = 0, \dots, T - 1` (no warm-up, the last step
uses a small but non-zero rate), and :math:`[lo, hi]` the per-channel range of valid pixels.
:math:`\mathrm{aug}_t` is, for the *whole batch*, ONE RandomResizedCrop box (scale ``crop_scale``,
ratio (3/4, 4/3)), ONE horizontal-flip draw and ONE wrap-around ``torch.roll`` by
:math:`(d_y, d_x) \sim U\{lo_j, \dots, hi_j\}^2`, in that order. The LAST iterate is kept.

Batch layouts (B = ``batch_budget``, k = IPC):

* :func:`class_batches` (WMDD): groups of ``B // k`` consecutive classes with all k slots each
  (IPC 1 -> 100 classes per batch, 10 -> 10, 50 -> 2, 100 -> 1); for k > B a class's slots are
  split into ``ceil(k / B)`` batches of at most B images (IPC is never capped at 100).
* :func:`slot_batches` (SRe2L): for each slot, the classes in chunks of B.

Groups are formed from *global* class indices (group g = classes ``[g * G, (g + 1) * G)``), so a
class range whose ends lie on group boundaries (or at the dataset's last class) yields exactly
the batches, hence the images, of the full run: sharding does not change results.

Randomness (never the global RNG): the initial image of (class c, slot m) comes from
``generator(seed, "init", c, m)``; all augmentation draws of a batch from
``generator(seed, "aug", c0, m0)`` with (c0, m0) its first (class, slot). Generators live on the
CPU, so the draws are the same on every device.

Departures from the official code (github Liu-Hy/WMDD, VILA-Lab/SRe2L), all deliberate:

* Crop-and-resize uses :func:`wmdd.augment.views.resized_crops` (``roi_align``, bilinear with adaptive
  area sampling) instead of torchvision's antialiased ``resize``; the draw rule is the same.
* Gradients are taken with ``torch.autograd.grad`` with respect to the pixels only, so the
  teacher's parameters never accumulate ``.grad`` (the official code calls ``backward``).
* Storage is lossless by default. ``jpeg_quality > 0`` reproduces the official JPEG round trip
  (quality 75) on the final images; it needs the ``to_pixels``/``from_pixels`` maps of the
  dataset (see :func:`pixel_maps`), since this module does not know the normalisation.
* A non-finite loss stops the run with ``FloatingPointError`` instead of continuing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from wmdd.augment.views import random_roll, resized_crops, sample_crop_boxes, sample_flips
from wmdd.checkpoint import Checkpointer
from wmdd.config import Precision, check_ranges
from wmdd.data.prepared import TrainingImages
from wmdd.synthetic_set import final_loss_stats, jpeg_roundtrip
from wmdd.utils import autocast, cosine_factor, generator

__all__ = [
    "LossFn",
    "SynthBatch",
    "SynthesisConfig",
    "batch_views",
    "check_aligned",
    "class_batches",
    "default_jitter",
    "jpeg_roundtrip_normalised",
    "pixel_maps",
    "real_image_init",
    "slot_batches",
    "synthesize",
    "synthesize_dataset",
]


@dataclass(frozen=True)
class SynthesisConfig:
    """Settings of the synthesis loop (published values: WMDD/SRe2L at 224 px)."""

    iterations: int = 2000  # optimisation steps per batch (T)
    lr: float = 0.25  # Adam learning rate, cosine-decayed to 0 over the iterations, no warm-up
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas
    eps: float = 1e-8  # Adam eps
    batch_budget: int = 100  # B: images per batch; classes_per_batch = min(B // k, C)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of the one crop per batch-step
    flip: bool = True  # one horizontal-flip draw per batch-step
    jitter: tuple[int, int] = (0, 32)  # roll range (lo, hi), px; see default_jitter()
    init: Literal["noise", "real"] = "noise"  # N(0, 1) in normalised space, or a real image
    jpeg_quality: int = 0  # 0 = lossless (default); 75 = the official code's JPEG round trip
    # "fp32" (default, published numerics) or "bf16": the teacher forward and the loss under
    # bfloat16 autocast (opt-in; faster where the CPU has AVX512-BF16; README "Performance")
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least={"iterations": 1, "batch_budget": 1},
            positive=("lr", "eps"),
            scales=("crop_scale",),
        )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.jitter[0] > self.jitter[1]:
            raise ValueError(f"jitter: expected (lo, hi) with lo <= hi, got {self.jitter!r}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 0 (off) or 1..100, got {self.jpeg_quality!r}")


def default_jitter(resolution: int) -> tuple[int, int]:
    """Roll range for a resolution, keeping both published conventions exactly.

    The ImageNet-style code (224 px) rolls by :math:`U\\{0..32\\}` (about 1/7 of the side); the
    Tiny-ImageNet code (64 px) by :math:`U\\{-4..4\\}` (1/16 of the side). We use the first rule
    from 128 px up, ``(0, round(32 * res / 224))``, and the symmetric one below,
    ``(-m, m)`` with ``m = max(1, round(res / 16))``: 224 -> (0, 32), 128 -> (0, 18),
    64 -> (-4, 4), 32 -> (-2, 2), 16 -> (-1, 1). The config value is what the loop uses.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if resolution >= 128:
        return 0, round(32 * resolution / 224)
    m = max(1, round(resolution / 16))
    return -m, m


@dataclass(frozen=True)
class SynthBatch:
    """One independently optimised batch: image i is slot ``slots[i]`` of class ``classes[i]``."""

    classes: Tensor  # (b,) int64 class of each image
    slots: Tensor  # (b,) int64 IPC slot of each image

    def __post_init__(self) -> None:
        c, s = self.classes, self.slots
        if c.ndim != 1 or c.shape != s.shape or c.numel() == 0:
            raise ValueError(
                "SynthBatch: need equal non-empty (b,) tensors, got "
                f"{tuple(c.shape)} and {tuple(s.shape)}"
            )
        if c.dtype != torch.long or s.dtype != torch.long:
            raise ValueError(f"SynthBatch: classes/slots must be int64, got {c.dtype}, {s.dtype}")

    def __len__(self) -> int:
        return int(self.classes.numel())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SynthBatch):
            return NotImplemented
        return torch.equal(self.classes, other.classes) and torch.equal(self.slots, other.slots)

    def __hash__(self) -> int:
        return hash((tuple(self.classes.tolist()), tuple(self.slots.tolist())))

    @property
    def key(self) -> tuple[int, int]:
        """(first class, first slot): names the batch's augmentation generator."""
        return int(self.classes[0]), int(self.slots[0])


def _make_batch(pairs: Sequence[tuple[int, int]]) -> SynthBatch:
    """A batch from (class, slot) pairs, in the given order."""
    t = torch.tensor(pairs, dtype=torch.long)  # (b, 2)
    return SynthBatch(classes=t[:, 0].contiguous(), slots=t[:, 1].contiguous())


def _as_range(classes: Sequence[int]) -> range:
    """``classes`` as a ``range`` of consecutive indices; ValueError otherwise."""
    values = [int(c) for c in classes]
    if not values:
        raise ValueError("classes must not be empty")
    if values != list(range(values[0], values[0] + len(values))) or values[0] < 0:
        raise ValueError(f"classes must be consecutive non-negative indices a..b-1, got {values}")
    return range(values[0], values[-1] + 1)


def check_aligned(
    classes: Sequence[int], group_size: int, *, num_classes: int | None = None
) -> range:
    """Check that a class range starts and ends on global group boundaries.

    Group g holds classes ``[g * group_size, (g + 1) * group_size)``; a range ``a..b-1`` gives the
    same batches as the full run iff ``a`` is a multiple of ``group_size`` and ``b`` is too or
    ``b`` is the dataset's class count. With ``num_classes=None`` the range is taken to end at the
    dataset's last class (only the start is checked): callers that shard must pass it.

    Returns:
        The classes as a ``range``.

    Raises:
        ValueError: Naming the nearest valid boundaries when the range splits a group.
    """
    class_range = _as_range(classes)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_classes is not None and class_range.stop > num_classes:
        raise ValueError(
            f"classes {class_range.start}:{class_range.stop} exceed the {num_classes} classes"
        )
    for name, edge in (("start", class_range.start), ("end", class_range.stop)):
        dataset_end = name == "end" and (num_classes is None or edge == num_classes)
        if edge % group_size == 0 or dataset_end:
            continue
        lo = edge - edge % group_size
        raise ValueError(
            f"class range {class_range.start}:{class_range.stop} splits a batch group of {group_size} classes at "
            f"its {name} ({edge}); use a boundary that is a multiple of {group_size} "
            f"(e.g. {lo} or {lo + group_size}) or the last class"
        )
    return class_range


def class_batches(
    classes: Sequence[int], ipc: int, budget: int = 100, *, num_classes: int | None = None
) -> list[SynthBatch]:
    """WMDD layout: groups of ``max(1, budget // ipc)`` classes with all their slots.

    Within a batch images are ordered by (class, slot). For ``ipc > budget`` each class alone is
    split into ``ceil(ipc / budget)`` batches of slots ``[j * budget, (j + 1) * budget)``.

    Args:
        classes: Consecutive class indices (a shard of the dataset's classes).
        ipc: Images per class k (>= 1; not capped).
        budget: Images per batch B.
        num_classes: The dataset's class count, needed to check a shard's end (see
            :func:`check_aligned`).

    Raises:
        ValueError: If the range splits a group, or ``ipc``/``budget`` < 1.
    """
    if ipc < 1 or budget < 1:
        raise ValueError(f"ipc and budget must be >= 1, got ipc={ipc}, budget={budget}")
    group = max(1, budget // ipc)
    class_range = check_aligned(classes, group, num_classes=num_classes)
    batches = []
    for start in range(class_range.start, class_range.stop, group):
        group_classes = range(start, min(start + group, class_range.stop))
        for s0 in range(0, ipc, budget):
            slots = range(s0, min(s0 + budget, ipc))
            batches.append(_make_batch([(c, s) for c in group_classes for s in slots]))
    return batches


def slot_batches(
    classes: Sequence[int], ipc: int, budget: int = 100, *, num_classes: int | None = None
) -> list[SynthBatch]:
    """SRe2L layout: for each slot, the classes in global chunks of ``budget`` (one image each).

    Batches are ordered slot-major; within a batch images are ordered by class.

    Raises:
        ValueError: If the range splits a chunk, or ``ipc``/``budget`` < 1.
    """
    if ipc < 1 or budget < 1:
        raise ValueError(f"ipc and budget must be >= 1, got ipc={ipc}, budget={budget}")
    class_range = check_aligned(classes, budget, num_classes=num_classes)
    return [
        _make_batch([(c, s) for c in range(start, min(start + budget, class_range.stop))])
        for s in range(ipc)
        for start in range(class_range.start, class_range.stop, budget)
    ]


def real_image_init(data: TrainingImages, seed: int) -> Callable[[int, int], Tensor]:
    """``real_init`` for :func:`synthesize`: slot m of class c starts as a real image.

    The image is entry m of a permutation of the class's training images drawn from
    ``generator(seed, "real_init", c)`` (so slots are distinct and shard-independent), in
    normalised space, shape (C, H, W). Check ``ipc`` with ``data.check_ipc`` first.
    """
    cache: dict[int, Tensor] = {}

    def init(c: int, slot: int) -> Tensor:
        if c not in cache:
            index = data.train_indices_of_class(c)  # (n_c,) train positions, dataset order
            cache.clear()  # classes are visited in order: keep one
            cache[c] = index[torch.randperm(len(index), generator=generator(seed, "real_init", c))]
        return data.normalize(data.train_images(cache[c][slot : slot + 1]))[0]  # (C, H, W)

    return init


def pixel_maps(
    data: TrainingImages,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(to_pixels, from_pixels): normalised space <-> [0, 1] pixels of ``data``."""
    return data.denormalize, lambda p: data.normalize(p * 255.0)


def jpeg_roundtrip_normalised(
    images: Tensor,
    *,
    quality: int,
    to_pixels: Callable[[Tensor], Tensor],
    from_pixels: Callable[[Tensor], Tensor],
) -> Tensor:
    """JPEG-encode and decode normalised images (N, C, H, W) via [0, 1] pixels (CPU)."""
    pixels = to_pixels(images.detach().cpu())  # (N, C, H, W) in [0, 1]
    return from_pixels(jpeg_roundtrip(pixels, quality=quality)).float()


def batch_views(x: Tensor, cfg: SynthesisConfig, gen: torch.Generator) -> Tensor:
    """One crop box for the whole batch, one flip draw, then one wrap-around roll.

    Args:
        x: Images (b, C, H, H).
        cfg: Supplies ``crop_scale``, ``flip`` and ``jitter``.
        gen: The batch's CPU generator (advanced by the draws).

    Returns:
        (b, C, H, H), differentiable with respect to ``x``.
    """
    b, _, h, w = x.shape
    box = sample_crop_boxes(1, h, w, scale=cfg.crop_scale, generator=gen)  # (1, 4)
    x = resized_crops(x, box.expand(b, 4), h)  # (b, C, H, H)
    if cfg.flip and bool(sample_flips(1, generator=gen)[0]):
        x = x.flip(-1)
    return random_roll(x, max_shift=cfg.jitter, generator=gen)


LossFn = Callable[[Tensor, SynthBatch], tuple[Tensor, dict[str, float]]]


def _init_batch(
    batch: SynthBatch,
    shape: tuple[int, int, int],
    seed: int,
    real_init: Callable[[int, int], Tensor] | None,
) -> Tensor:
    """Initial images (b, C, H, W) on the CPU: N(0, 1) per (class, slot), or real images."""
    pairs = zip(batch.classes.tolist(), batch.slots.tolist(), strict=True)
    if real_init is not None:
        return torch.stack([real_init(c, s).float() for c, s in pairs])
    noise = [torch.randn(shape, generator=generator(seed, "init", c, s)) for c, s in pairs]
    return torch.stack(noise)  # (b, C, H, W)


def _optimise_batch(
    batch: SynthBatch,
    *,
    loss_fn: LossFn,
    cfg: SynthesisConfig,
    seed: int,
    x0: Tensor,
    bounds: tuple[Tensor, Tensor],
    device: torch.device,
    resume: dict | None = None,
    on_iteration: Callable[[Callable[[], dict]], None] | None = None,
    cosine_window: tuple[int, int] | None = None,
) -> tuple[Tensor, dict[str, float], list[dict[str, float]]]:
    """Adam + cosine lr + clamp on one batch from ``x0``; returns the last iterate, its loss
    components and every iteration's components (the batch's loss curve).

    ``resume`` (a state ``on_iteration`` was given) continues an interrupted batch exactly:
    iterate, Adam state, augmentation generator, iteration count and curve so far.
    ``on_iteration`` receives, after every step, a callable building that state (called
    only when saved).
    """
    x = x0.to(device).requires_grad_(True)  # (b, C, H, W); clamped after each step, not before
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    gen = generator(seed, "aug", *batch.key)
    components: dict[str, float] = {}
    history: list[dict[str, float]] = []
    first = 0
    if resume is not None:
        with torch.no_grad():
            x.copy_(resume["x"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        first, components = resume["t"], resume["components"]
        history = list(resume.get("history", []))
    offset, total = cosine_window or (0, cfg.iterations)
    for t in range(first, cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cosine_factor(offset + t, total)
        views = batch_views(x, cfg, gen)  # float32 views; the teacher and loss under autocast
        with autocast(cfg.precision, device):
            loss, components = loss_fn(views, batch)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"non-finite synthesis loss {float(loss.detach())} at iteration {t} of batch "
                f"{batch.key} (components {components})"
            )
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        with torch.no_grad():
            x.clamp_(*bounds)
        components = {**components, "loss": float(loss.detach())}
        history.append(components)
        if on_iteration is not None:

            def snapshot(done: int = t + 1, comps: dict[str, float] = components) -> dict:
                return {
                    "t": done,
                    "x": x.detach().cpu().clone(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "components": comps,
                    "history": list(history),
                }

            on_iteration(snapshot)
    return x.detach().cpu(), components, history


def _sorted_by_class_slot(
    images: list[Tensor], batches: Sequence[SynthBatch]
) -> tuple[Tensor, Tensor]:
    """Concatenate batch outputs and sort them by (class, slot); reject duplicate pairs."""
    classes = torch.cat([b.classes for b in batches])  # (N,)
    slots = torch.cat([b.slots for b in batches])  # (N,)
    key = classes * (int(slots.max()) + 1) + slots  # (N,)
    if key.unique().numel() != key.numel():
        raise ValueError("batches contain a (class, slot) pair more than once")
    order = torch.argsort(key)
    return torch.cat(images)[order], classes[order]


def synthesize(
    *,
    batches: Sequence[SynthBatch],
    loss_fn: LossFn,
    cfg: SynthesisConfig,
    seed: int,
    shape: tuple[int, int, int],
    pixel_bounds: tuple[Tensor, Tensor],
    device: torch.device,
    real_init: Callable[[int, int], Tensor] | None = None,
    progress: bool = True,
    to_pixels: Callable[[Tensor], Tensor] | None = None,
    from_pixels: Callable[[Tensor], Tensor] | None = None,
    checkpoint: Checkpointer | None = None,
    cosine_window: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Optimise every batch independently from scratch (see the module docstring).

    Args:
        batches: From :func:`class_batches` or :func:`slot_batches`.
        loss_fn: ``loss_fn(augmented (b, C, H, W), batch) -> (scalar loss, {name: float})``.
        cfg: Loop settings; ``cfg.init == "real"`` requires ``real_init``.
        seed: Base seed of the init and augmentation generators.
        shape: (C, H, W) of one image; H == W.
        pixel_bounds: Per-channel (lo, hi), each (1, C, 1, 1), e.g. ``data.pixel_bounds(device)``.
        device: Where the images are optimised.
        real_init: ``real_init(c, slot) -> (C, H, W)`` normalised image (e.g.
            :func:`real_image_init`); used iff ``cfg.init == "real"``.
        progress: tqdm bar over batches.
        to_pixels: Normalised -> [0, 1] pixels; with ``from_pixels``, needed iff
            ``cfg.jpeg_quality > 0`` (see :func:`pixel_maps`).
        from_pixels: [0, 1] pixels -> normalised space.
        checkpoint: Saves the finished batches and the current batch's state between
            iterations and resumes from them (the result is the same, bit for bit).
        cosine_window: ``(offset, total)``: these ``cfg.iterations`` steps are steps
            ``offset ..`` of one cosine over ``total`` (a stage of a multi-stage schedule,
            e.g. FADRM's); ``None`` = one cosine over ``cfg.iterations``.

    Returns:
        ``(images (N, C, H, W) float32 CPU, labels (N,) int64, stats)`` sorted by (class, slot);
        stats: ``iterations``, ``final_loss`` (mean over batches of the last iteration's loss),
        ``final_components`` (same, per component), ``batch_keys`` / ``batch_finals`` (each
        batch's last losses, by batch key; see :func:`wmdd.synthetic_set.final_loss_stats`),
        ``curve_sum`` / ``curve_batches`` / ``curve_names`` (every iteration's loss components
        summed over batches, (T, K), the number of batches and the K names: the mean batch's
        loss curve, which the distill stage logs to MLflow), ``optimise_seconds``.

    Raises:
        ValueError: On an empty batch list, non-square shape, missing ``real_init`` or pixel
            maps, or duplicate (class, slot) pairs.
        FloatingPointError: On a non-finite loss.
    """
    if not batches:
        raise ValueError("synthesize: no batches")
    if shape[1] != shape[2]:
        raise ValueError(f"synthesize: square images only, got shape {shape}")
    if cfg.init == "real" and real_init is None:
        raise ValueError("synthesize: cfg.init='real' needs a real_init callable")
    if cfg.jpeg_quality and (to_pixels is None or from_pixels is None):
        raise ValueError("synthesize: jpeg_quality > 0 needs to_pixels and from_pixels")
    offset, total = cosine_window or (0, cfg.iterations)
    if not 0 <= offset <= total - cfg.iterations:
        raise ValueError(f"synthesize: cosine_window {cosine_window} does not hold "
                         f"{cfg.iterations} iterations")  # fmt: skip
    bounds = (pixel_bounds[0].to(device), pixel_bounds[1].to(device))
    start = time.perf_counter()
    outputs: list[Tensor] = []
    finals: list[dict[str, float]] = []
    curves: list[Tensor] = []  # per batch (T, K): every iteration's loss components
    partial = None
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        outputs, finals, partial = state["outputs"], state["finals"], state["partial"]
        curves = state.get("curves", [])

    def save(current: int, batch_state: Callable[[], dict] | None) -> None:
        if checkpoint is None:
            return

        def state() -> dict:
            part = batch_state() if batch_state is not None else None
            step = f"iteration {part['t']}" if part else "start"
            where = f"batch {current + 1} of {len(batches)}, {step}"
            return {"where": where, "outputs": outputs, "finals": finals, "partial": part,
                    "curves": curves}  # fmt: skip

        checkpoint.step(state)

    bar = tqdm(batches, desc="synthesis batches", disable=not progress, initial=len(outputs))
    for index, batch in enumerate(batches):
        if index < len(outputs):  # finished before an interruption
            continue
        x0 = _init_batch(batch, shape, seed, real_init if cfg.init == "real" else None)
        x, final, history = _optimise_batch(
            batch,
            loss_fn=loss_fn,
            cfg=cfg,
            seed=seed,
            x0=x0,
            bounds=bounds,
            device=device,
            resume=partial if partial is not None else None,
            on_iteration=functools.partial(save, index),
            cosine_window=(offset, total),
        )
        partial = None
        outputs.append(x)
        finals.append(final)
        names = sorted(final)
        curves.append(torch.tensor([[h[k] for k in names] for h in history], dtype=torch.float64))
        save(index + 1, None)
        bar.update(1)
        bar.set_postfix(loss=f"{final['loss']:.4g}")
    bar.close()
    images, labels = _sorted_by_class_slot(outputs, batches)
    if cfg.jpeg_quality:
        assert to_pixels is not None and from_pixels is not None
        images = jpeg_roundtrip_normalised(
            images, quality=cfg.jpeg_quality, to_pixels=to_pixels, from_pixels=from_pixels
        )
    keys = [list(b.key) for b in batches]
    stats = {
        **final_loss_stats(keys, finals),
        # The loss curve summed over batches, (T, K) with K = curve_names; divided by
        # curve_batches it is the mean batch's curve (shards add both: SUMMED_AUX).
        "curve_sum": torch.stack(curves).sum(dim=0),
        "curve_batches": torch.tensor(float(len(curves))),
        "curve_names": sorted(finals[0]),
        "iterations": cfg.iterations,
        "optimise_seconds": time.perf_counter() - start,
    }
    return images, labels, stats


def synthesize_dataset(
    data: TrainingImages,
    *,
    batches: Sequence[SynthBatch],
    loss_fn: LossFn,
    cfg: SynthesisConfig,
    seed: int,
    device: torch.device,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
    shape: tuple[int, int, int] | None = None,
    real_init: Callable[[int, int], Tensor] | None = None,
    cosine_window: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """:func:`synthesize` with the image shape, clamp bounds, real-image init and JPEG pixel
    maps taken from ``data`` (what WMDD and SRe2L both need). ``shape`` (another resolution),
    ``real_init`` (another initialisation) and ``cosine_window`` are for multi-stage
    schedules such as FADRM's."""
    to_pixels, from_pixels = pixel_maps(data)
    if real_init is None and cfg.init == "real":
        real_init = real_image_init(data, seed)
    return synthesize(
        batches=batches,
        loss_fn=loss_fn,
        cfg=cfg,
        seed=seed,
        shape=shape or (data.channels, data.resolution, data.resolution),
        pixel_bounds=data.pixel_bounds(device),
        device=device,
        real_init=real_init,
        progress=progress,
        to_pixels=to_pixels,
        from_pixels=from_pixels,
        checkpoint=checkpoint,
        cosine_window=cosine_window,
    )
