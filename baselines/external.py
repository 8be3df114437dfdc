"""An external set: distilled images made elsewhere, evaluated under the suite's protocol as a
method row of their own (README "Evaluating your own set").

    methods:
      my_set:
        method: external
        path: /data/my_set/ipc{ipc}     # "{ipc}" becomes the cell's IPC

``path`` is either

* an ImageFolder, ``<path>/<class name>/<image file>``: one folder per class of the profile,
  named as the profile's classes (``data/<profile>/manifest.json``), ``ipc`` images in each
  (PNG, JPEG, BMP, WebP, 8-bit greyscale or colour as the profile's images; taken in
  file-name order); or
* a tensor file (``torch.save``, read with ``weights_only``) holding ``images`` (N, C, H, W),
  uint8 or float pixel values in [0, 1] (not normalised), ``labels`` (N,) class indices and
  ``classes``, the class names in label order.

Nothing is resized, converted or clipped: a set whose class list or order, image size,
channels, images per class or pixel range does not match the profile and the cell is
refused with a message naming the file and the expected and found values. The images are
normalised with the profile's statistics, as every prepared dataset is. The source's
SHA-256 (every file's relative path and bytes, in order) is kept in ``aux["source"]``, in the
set's ``meta.json`` and on the MLflow run, so each row names the content it evaluated (DVC
tracks the ``path`` param, not the files behind it: after editing them in place, re-run the
cell with ``dvc repro -f -s distill@<profile>-<row>-<ipc>``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from wmdd.data.prepared import stat_tensors
from wmdd.synthetic_set import SyntheticSet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# 8-bit image modes read per profile channel count (alpha dropped, palettes expanded)
MODES = {1: {"L", "LA", "1"}, 3: {"RGB", "RGBA", "P"}}


@dataclass(frozen=True)
class ExternalConfig:
    """Where the set is: an ImageFolder or a tensor file; ``{ipc}`` is replaced by the IPC."""

    path: str

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: expected an ImageFolder or a tensor file, got ''")


def source_path(config: ExternalConfig, ipc: int) -> Path:
    return Path(config.path.replace("{ipc}", str(ipc))).expanduser()


def source_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative path and bytes, in path order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _check_classes(found: list[str], expected: list[str], where: str) -> None:
    if found == expected:
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    detail = f"missing {missing}, unexpected {extra}" if missing or extra else "another order"
    raise ValueError(
        f"{where}: the classes do not match the profile ({detail}); expected "
        f"{len(expected)} classes {expected}, found {len(found)} {found}"
    )


def _check_counts(labels: Tensor, classes: list[str], ipc: int, where: str) -> None:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    wrong = {classes[c]: n for c, n in enumerate(counts) if n != ipc}
    if wrong:
        raise ValueError(
            f"{where}: expected {ipc} images per class (the cell's IPC), found {wrong}"
        )


def _read_image(file: Path, channels: int, resolution: int) -> Tensor:
    """One image as uint8 (C, R, R); refuses another size (nothing is resized)."""
    try:
        with Image.open(file) as img:
            img.load()
            size, mode = img.size, img.mode
            if mode not in MODES.get(channels, set()):
                raise ValueError(
                    f"{file}: image mode {mode}, expected one of {sorted(MODES.get(channels, set()))} "
                    f"(the profile's images have {channels} channel(s))"
                )
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{file}: not a readable image ({err})") from err
    if size != (resolution, resolution):
        raise ValueError(
            f"{file}: expected {resolution}x{resolution} pixels (the profile's resolution), "
            f"found {size[0]}x{size[1]}; nothing is resized"
        )
    x = torch.from_numpy(array.copy())
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)


def read_image_folder(
    root: Path, classes: list[str], *, channels: int, resolution: int
) -> tuple[Tensor, Tensor]:
    """uint8 images (N, C, R, R) and labels from ``root/<class>/<file>``, in class order and
    file-name order within a class."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    _check_classes(sorted(found), sorted(classes), str(root))
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        images += [_read_image(f, channels, resolution) for f in files]
        labels += [c] * len(files)
    if not images:
        raise ValueError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def read_tensor_file(
    file: Path, classes: list[str], *, channels: int, resolution: int
) -> tuple[Tensor, Tensor]:
    """Images (N, C, R, R) (uint8, or float pixels in [0, 1]) and labels from a tensor file
    with ``images``, ``labels`` and ``classes``."""
    try:
        state: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise ValueError(
            f"{file}: not a readable tensor file ({type(err).__name__}: {err})"
        ) from err
    keys = {"images", "labels", "classes"}
    if not isinstance(state, dict) or not keys <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{file}: expected a dict with keys {sorted(keys)}, found {found}")
    images, labels, names = state["images"], state["labels"], state["classes"]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{file}: classes: expected a list of class names")
    _check_classes(list(names), classes, f"{file}: classes")
    want = (channels, resolution, resolution)
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != want:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"{file}: images: expected (N, {', '.join(map(str, want))}), found {shape}"
        )
    if not isinstance(labels, Tensor) or labels.shape != (len(images),):
        raise ValueError(f"{file}: labels: expected ({len(images)},) class indices")
    labels = labels.long()
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"{file}: labels: expected indices in [0, {len(classes)})")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"{file}: images: expected uint8 or float, found {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"{file}: images: expected pixel values in [0, 1] (not normalised), found "
                f"[{lo:.4g}, {hi:.4g}]"
            )
    order = torch.argsort(labels, stable=True)  # (class, slot) order
    return images[order], labels[order]


def external_set(
    *,
    teacher: Any,
    data: Any,
    classes: range,
    ipc: int,
    config: ExternalConfig,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> SyntheticSet:
    """Reads, checks and normalises the external set; returns ``classes``' images."""
    path = source_path(config, ipc)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (methods.<row>.path)")
    names = list(data.classes)
    read = read_image_folder if path.is_dir() else read_tensor_file
    images, labels = read(path, names, channels=data.channels, resolution=data.resolution)
    _check_counts(labels, names, ipc, str(path))
    keep = (labels >= classes.start) & (labels < classes.stop)
    images, labels = images[keep], labels[keep]
    if images.dtype == torch.uint8:
        x = data.normalize(images)
    else:  # float pixels in [0, 1]: the same normalisation, without rounding to 8 bits
        mean, std = stat_tensors(data.mean, data.std, images.device)
        x = (images.float() - mean) / std
    source = {
        "path": str(path),
        "format": "imagefolder" if path.is_dir() else "tensor",
        "sha256": source_digest(path),
    }
    return SyntheticSet(x.to(device), labels.to(device), aux={"source": source})
