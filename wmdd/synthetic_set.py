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
    ``peak_mem_mb``, ``images``, ``images_per_second`` and the method's own phase timings
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
