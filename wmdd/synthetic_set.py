"""The synthetic-set contract between methods and the protocol, its storage and preview.

A method returns a :class:`SyntheticSet`: images in the dataset's **normalised** space
(N, C, H, W) float32, integer labels (N,), optional per-image weights. Sets are stored
losslessly (``set.pt``); an optional JPEG round trip (what the official WMDD/SRe2L code
saved) is applied by :func:`jpeg_roundtrip` when a method asks for it.
"""

from __future__ import annotations

import inspect
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from wmdd.checkpoint import StageCheckpoints
from wmdd.paths import SET_FILE
from wmdd.utils import (
    ArtifactError,
    atomic_dir,
    load_artifact,
    peak_memory_mb,
    reset_peak_memory,
    write_json,
)

AUX_FILE = "aux.pt"
PREVIEW_FILE = "preview.png"
META_FILE = "meta.json"


@dataclass
class SyntheticSet:
    images: Tensor  # (N, C, H, W) float32, normalised space
    labels: Tensor  # (N,) int64
    weights: Tensor | None = None  # (N,) optional per-image weights
    # Side outputs a method wants versioned with the set (saved to aux.pt by the distill
    # stage), e.g. WMDD's barycenters and per-class BN statistics; "timings" (a dict of
    # seconds per phase) is logged to MLflow as metrics.
    aux: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"synthetic set: expected images (N, C, H, W) and labels (N,), got "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )
        if not torch.isfinite(self.images).all():
            raise FloatingPointError("synthetic set contains non-finite pixels")

    def image_bytes(self) -> int:
        """Bytes of the images (and per-image weights) as :meth:`save` stores them."""
        weights = 0 if self.weights is None else self.weights.numel() * self.weights.element_size()
        return self.images.numel() * self.images.element_size() + weights

    def save(self, path: Path) -> None:
        torch.save(
            {
                "images": self.images.float().cpu().contiguous(),
                "labels": self.labels.long().cpu(),
                "weights": None if self.weights is None else self.weights.float().cpu(),
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> SyntheticSet:
        """Reads ``set.pt``; errors name the file (corrupt, wrong keys, wrong shapes)."""
        keys = ("images", "labels", "weights")
        state = load_artifact(path, "synthetic set", keys=keys, stage="distill")
        try:
            return cls(**{k: state[k] for k in keys})
        except (ValueError, TypeError, AttributeError) as err:
            raise ArtifactError(f"{path}: not a valid synthetic set: {err}") from None


def to_uint8(pixels: Tensor) -> np.ndarray:
    """[0, 1] float (C, H, W) -> (H, W, C) or (H, W) uint8 array."""
    arr = pixels.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def jpeg_roundtrip(pixels: Tensor, quality: int = 75) -> Tensor:
    """Encodes [0, 1] images (N, C, H, W) as JPEG at ``quality`` and decodes them back."""
    out = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
        decoded = decoded[..., None] if decoded.ndim == 2 else decoded
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out)


def preview_grid(
    pixels: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    max_classes: int = 10,
    max_per_class: int = 10,
    upscale_to: int = 48,
) -> Image.Image:
    """A grid image: one row per class (first ``max_classes``), up to ``max_per_class`` images.

    Args:
        pixels: (N, C, H, W) in [0, 1].
    """
    classes = list(range(min(num_classes, max_classes)))
    per_class = [pixels[labels == c][:max_per_class] for c in classes]
    cols = max(1, max(len(p) for p in per_class))
    side = pixels.shape[-1]
    scale = max(1, upscale_to // side)
    cell = side * scale + 2
    canvas = Image.new("RGB", (cols * cell, len(classes) * cell), "white")
    for r, imgs in enumerate(per_class):
        for c, img in enumerate(imgs):
            tile = Image.fromarray(to_uint8(img)).convert("RGB")
            tile = tile.resize((side * scale, side * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (c * cell + 1, r * cell + 1))
    return canvas


def parse_class_range(spec: str | None, num_classes: int) -> range:
    """``"a:b"`` -> ``range(a, b)`` (all classes for ``None`` or ``""``), checked."""
    if not spec:
        return range(num_classes)
    try:
        lo, hi = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--classes: expected 'a:b', got {spec!r}") from None
    if not 0 <= lo < hi <= num_classes:
        raise ValueError(f"--classes {spec}: expected 0 <= a < b <= {num_classes}")
    return range(lo, hi)


def run_method(
    fn: Callable[..., SyntheticSet],
    *,
    device: torch.device,
    checkpoint: Any = None,
    **kwargs: Any,
) -> tuple[SyntheticSet, dict[str, float]]:
    """Runs a method and measures it: ``(set, metrics)`` with ``distill_seconds``,
    ``peak_mem_mb``, ``images``, ``images_per_second``, ``image_bytes`` (the images as
    ``set.pt`` stores them: float32, with the per-image weights if any) and the method's own
    phase timings
    (``aux["timings"]``, popped) as ``time_<phase>_seconds``. ``checkpoint`` (a
    :class:`wmdd.checkpoint.Checkpointer`) is passed to methods that take one (the long
    optimisations: WMDD, SRe2L, DM)."""
    if checkpoint is not None and "checkpoint" in inspect.signature(fn).parameters:
        kwargs["checkpoint"] = checkpoint
    reset_peak_memory(device)
    start = time.perf_counter()
    synthetic = fn(device=device, **kwargs)
    seconds = time.perf_counter() - start
    timings = synthetic.aux.pop("timings", {})
    return synthetic, {
        **{f"time_{k}_seconds": float(v) for k, v in timings.items()},
        "distill_seconds": seconds,
        "peak_mem_mb": peak_memory_mb(device),
        "images": len(synthetic.labels),
        "images_per_second": len(synthetic.labels) / max(seconds, 1e-9),
        "image_bytes": float(synthetic.image_bytes()),
    }


def save_distilled(out: Path, synthetic: SyntheticSet, data: Any, *, meta: dict) -> Path:
    """Writes a distill stage's output directory atomically: ``set.pt``, ``aux.pt`` (if the
    method returned side outputs), ``preview.png`` and ``meta.json``; returns the preview's
    path. ``data`` supplies ``denormalize`` and ``num_classes``."""
    grid = preview_grid(data.denormalize(synthetic.images), synthetic.labels, data.num_classes)
    with atomic_dir(out) as tmp:
        synthetic.save(tmp / SET_FILE)
        if synthetic.aux:
            torch.save(synthetic.aux, tmp / AUX_FILE)
        grid.save(tmp / PREVIEW_FILE)
        write_json(tmp / META_FILE, meta)
    return out / PREVIEW_FILE


# --- class-range shards ------------------------------------------------------------------

# per-iteration curves summed over a run's classes (DM) or batches (the synthesis loop)
SUMMED_AUX = {"loss", "curve_sum", "curve_batches"}
SYNTHESIS_STATS = {"final_loss", "final_components", "batch_keys", "batch_finals"}


def final_loss_stats(keys: list[list[int]], finals: list[dict[str, float]]) -> dict[str, Any]:
    """Per-batch final losses of the synthesis loop, ordered by batch key (first class, first
    slot), and their means: the same numbers whether the classes ran in one process or in
    class-range shards (:func:`merge_shards`)."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    batch_keys, batch_finals = [keys[i] for i in order], [finals[i] for i in order]
    mean = {k: sum(f[k] for f in batch_finals) / len(batch_finals) for k in batch_finals[0]}
    return {
        "final_loss": mean.pop("loss"),
        "final_components": mean,
        "batch_keys": batch_keys,
        "batch_finals": batch_finals,
    }


UNION_AUX = {"real_per_class_effective"}  # sorted lists of the values seen (DM)


def _merge_value(key: str, values: list[Any], n_classes: list[int], n_images: list[int]) -> Any:
    """One aux entry of the merged set (see :func:`merge_shards`)."""
    first = values[0]
    if key == "synthesis" and isinstance(first, dict) and "batch_finals" in first:
        keys = [k for v in values for k in v["batch_keys"]]
        finals = [f for v in values for f in v["batch_finals"]]
        rest = {k: _merge_value(k, [v[k] for v in values], n_classes, n_images) for k in first
                if k not in SYNTHESIS_STATS}  # fmt: skip
        return {**rest, **final_loss_stats(keys, finals)}
    if isinstance(first, dict):
        return {k: _merge_value(k, [v[k] for v in values], n_classes, n_images) for k in first}
    if key in UNION_AUX:
        return sorted({x for v in values for x in v})
    if isinstance(first, Tensor):
        if key in SUMMED_AUX:
            return torch.stack(values).sum(dim=0)
        sizes = [int(v.shape[0]) if v.ndim else -1 for v in values]
        if sizes in (n_classes, n_images):
            return torch.cat(values)
    if isinstance(first, list) and first and isinstance(first[0], Tensor):
        return [
            _merge_value(key, [v[i] for v in values], n_classes, n_images)
            for i in range(len(first))
        ]
    if all(_equal(v, first) for v in values[1:]):
        return first
    raise ValueError(f"aux[{key!r}] differs between shards and has no merge rule")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)


def merge_shards(
    parts: list[tuple[range, SyntheticSet]], num_classes: int, ipc: int
) -> SyntheticSet:
    """The set a single run over all classes would have produced, from class-range shards.

    Checks that the ranges tile ``0..num_classes-1`` without gap or overlap and that every
    shard holds exactly ``ipc`` images of each of its classes, in (class, slot) order; then
    concatenates images, labels and weights in class order and merges ``aux``: per-class
    and per-image tensors are concatenated (WMDD's barycenters and BN statistics, herding's
    indices), the synthesis loop's per-batch final losses are joined and their means taken
    again (:func:`wmdd.synthesis.loop.final_loss_stats` orders them by batch key, so the
    numbers equal a single run's), per-iteration losses summed over classes (DM) are added
    (equal to a single run's up to float summation order), lists of values seen are joined,
    and anything else must be equal in every shard.

    Raises:
        ValueError: naming the gap, overlap or bad shard.
    """
    parts = sorted(parts, key=lambda p: p[0].start)
    expected = 0
    for rng, part in parts:
        if rng.start != expected:
            kind = "gap" if rng.start > expected else "overlap"
            raise ValueError(
                f"class shards: {kind} at class {expected} (next shard {rng.start}:{rng.stop})"
            )
        want = torch.arange(rng.start, rng.stop).repeat_interleave(ipc)
        if not torch.equal(part.labels.cpu(), want):
            raise ValueError(
                f"class shard {rng.start}:{rng.stop}: expected {ipc} images of each of its classes in order"
            )
        expected = rng.stop
    if expected != num_classes:
        raise ValueError(f"class shards cover classes 0:{expected}, expected 0:{num_classes}")
    sets = [p for _, p in parts]
    weights = (
        None
        if sets[0].weights is None
        else torch.cat([s.weights for s in sets if s.weights is not None])
    )
    n_classes = [len(r) for r, _ in parts]
    n_images = [len(s.labels) for s in sets]
    aux_keys = [k for k in sets[0].aux if k != "timings"]
    aux = {k: _merge_value(k, [s.aux[k] for s in sets], n_classes, n_images) for k in aux_keys}
    return SyntheticSet(
        images=torch.cat([s.images for s in sets]),
        labels=torch.cat([s.labels for s in sets]),
        weights=weights,
        aux=aux,
    )


def set_state(synthetic: SyntheticSet) -> dict[str, Any]:
    """A set as plain tensors and dicts (for a checkpoint's ``torch.save``)."""
    return {"images": synthetic.images, "labels": synthetic.labels, "weights": synthetic.weights,
            "aux": synthetic.aux}  # fmt: skip


def distill_classes(
    fn: Callable[..., SyntheticSet],
    *,
    classes: range,
    num_classes: int,
    ipc: int,
    resume: StageCheckpoints,
    method: str,
    **kwargs: Any,
) -> tuple[SyntheticSet | None, dict[str, float]]:
    """A distill stage's work for ``classes``, with class-range shards.

    A range short of all classes is a *shard*: it is computed, kept in the stage's
    checkpoint directory and returned without its set (the stage writes no output). For all
    classes, shards that tile them (written by earlier shard runs, e.g. the parallel
    runner's tasks) are merged (:func:`merge_shards`, which checks the tiling) instead of
    computing again; with no complete tiling the method runs over all classes.

    Returns:
        ``(set, metrics)``, the set ``None`` for a shard (merged metrics: the shards' seconds
        and images summed, the largest peak memory).
    """
    if len(classes) < num_classes:
        name = f"shard-{classes.start:06d}-{classes.stop:06d}"
        synthetic, metrics = run_method(fn, classes=classes, ipc=ipc, checkpoint=resume.loop(
            name, f"distill {method} classes {classes.start}:{classes.stop}"), **kwargs)  # fmt: skip
        resume.save_result(name, {"set": set_state(synthetic), "metrics": metrics})
        return None, metrics
    parts = resume.results("shard-")
    ranges = [range(*(int(x) for x in n.split("-")[1:])) for n in parts]
    covered = sorted((r.start, r.stop) for r in ranges)
    tiles = bool(covered) and covered[0][0] == 0 and covered[-1][1] == num_classes and all(
        a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # fmt: skip
    if not tiles:
        return run_method(fn, classes=classes, ipc=ipc, checkpoint=resume.loop(
            "synthesis", f"distill {method}"), **kwargs)  # fmt: skip
    sets = [(r, SyntheticSet(**{k: v for k, v in p["set"].items() if k != "aux"}, aux=p["set"]["aux"]))
            for r, p in zip(ranges, parts.values(), strict=True)]  # fmt: skip
    merged = merge_shards(sets, num_classes, ipc)
    shard_metrics = [p["metrics"] for p in parts.values()]
    metrics = {k: float(sum(m.get(k, 0.0) for m in shard_metrics)) for k in shard_metrics[0]}
    metrics["peak_mem_mb"] = max(m["peak_mem_mb"] for m in shard_metrics)
    metrics["images_per_second"] = metrics["images"] / max(metrics["distill_seconds"], 1e-9)
    metrics["shards"] = float(len(parts))
    return merged, metrics
