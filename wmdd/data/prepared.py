"""The prepared, versioned form of a dataset that every stage after ``prepare`` reads.

``data/<profile>/`` holds two files (both DVC outputs):

* ``data.pt`` — uint8 image tensors ``train_x`` (N, C, R, R), ``val_x`` and int64 labels;
* ``manifest.json`` — class index, counts per split and class, resolution, normalisation
  mean/std, checksums of ``data.pt`` and of the source, skipped files.

Convention used everywhere downstream: images handed to models, methods and the
protocol are float tensors in the dataset's *normalised* space ``(x / 255 - mean) / std``;
distilled sets are stored in that space too.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wmdd.utils import file_digest, load_artifact, read_json, write_json

DATA_FILE = "data.pt"
MANIFEST_FILE = "manifest.json"


def stat_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Per-channel normalisation constants as (C, 1, 1) float32 tensors on ``device``."""
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return as_tensor(list(mean)).view(-1, 1, 1), as_tensor(list(std)).view(-1, 1, 1)


def normalize_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, C, H, W) pixels -> float normalised space, ``(x / 255 - mean) / std``.

    The one normalisation of every prepared dataset, cached (:class:`PreparedData`) or lazy
    (:class:`wmdd.data.lazy.LazySplitSet`).
    """
    m, s = stat_tensors(mean, std, x.device)
    return (x.float() / 255.0 - m) / s


def denormalize_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised space -> [0, 1] pixel units, ``x * std + mean``, *not* clamped (values
    outside [0, 1] are what :mod:`wmdd.protocol.diagnostics` measures)."""
    m, s = stat_tensors(mean, std, x.device)
    return x * s + m


class TrainingImages(abc.ABC):
    """What methods and stages read from a prepared dataset, cached or lazy.

    :class:`PreparedData` (tensors in memory) and :class:`wmdd.data.lazy.LazySplitSet`
    (ImageNet-1K: decoded on demand) implement the four abstract members; everything else
    (normalisation, pixel bounds, the IPC check) is shared, so a method written against this
    interface runs on either. Training images are addressed by their position in the
    dataset's train split (dataset order), as ``aux["train_indices"]`` records them.
    """

    name: str  # registry name
    classes: list[str]  # class names, index = label
    mean: tuple[float, ...]  # per-channel normalisation mean (of [0, 1] pixels)
    std: tuple[float, ...]  # per-channel normalisation std

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    @abc.abstractmethod
    def channels(self) -> int: ...

    @property
    @abc.abstractmethod
    def resolution(self) -> int: ...

    @abc.abstractmethod
    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in ``split`` (``"train"`` or ``"val"``)."""

    @abc.abstractmethod
    def train_indices_of_class(self, c: int) -> Tensor:
        """Train-split positions of the images of class ``c``, in dataset order: (n_c,)."""

    @abc.abstractmethod
    def train_images(self, indices: Tensor) -> Tensor:
        """uint8 training images at ``indices`` (train-split positions), in that order."""

    def train_of_class(self, c: int) -> Tensor:
        """uint8 training images of class ``c``, in dataset order: (n_c, C, R, R)."""
        return self.train_images(self.train_indices_of_class(c))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float normalised space."""
        return normalize_pixels(x, self.mean, self.std)

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised space -> [0, 1] pixels (clamped), for previews."""
        return denormalize_pixels(x, self.mean, self.std).clamp(0, 1)

    def pixel_bounds(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Per-channel (lo, hi) of valid pixels in normalised space, each (1, C, 1, 1)."""
        mean, std = stat_tensors(self.mean, self.std, device)
        return ((0 - mean) / std).unsqueeze(0), ((1 - mean) / std).unsqueeze(0)

    def check_ipc(self, classes: Iterable[int], ipc: int) -> None:
        """Raises a ValueError naming the class when it has fewer than ``ipc`` training images
        (methods that select or start from real images need ``ipc`` distinct ones)."""
        counts = self.class_counts("train")
        classes = list(classes)
        for c in classes:
            if counts[c] < ipc:
                raise ValueError(
                    f"IPC {ipc} is larger than the {counts[c]} training images of class {c} "
                    f"({self.classes[c]!r}); choose ipc <= {min(counts[k] for k in classes)}"
                )


@dataclass
class PreparedData(TrainingImages):
    """A prepared dataset in memory (small datasets are cached whole as uint8)."""

    name: str  # registry name
    classes: list[str]  # class names, index = label
    mean: tuple[float, ...]  # per-channel normalisation mean (of [0, 1] pixels)
    std: tuple[float, ...]  # per-channel normalisation std
    train_x: Tensor  # (N, C, R, R) uint8
    train_y: Tensor  # (N,) int64
    val_x: Tensor  # (M, C, R, R) uint8
    val_y: Tensor  # (M,) int64

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.train_x.shape[-1])

    def class_counts(self, split: str = "train") -> list[int]:
        y = self.train_y if split == "train" else self.val_y
        return torch.bincount(y, minlength=self.num_classes).tolist()

    def train_indices_of_class(self, c: int) -> Tensor:
        return torch.nonzero(self.train_y == c).flatten()

    def train_images(self, indices: Tensor) -> Tensor:
        return self.train_x[indices]


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, as [0, 1] pixel statistics."""
    xf = x.double() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def save_prepared(data: PreparedData, out_dir: Path, extra_manifest: dict) -> dict:
    """Writes ``data.pt`` and ``manifest.json`` into ``out_dir``; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "train_x": data.train_x,
            "train_y": data.train_y,
            "val_x": data.val_x,
            "val_y": data.val_y,
        },
        out_dir / DATA_FILE,
    )
    manifest = {
        "dataset": data.name,
        "classes": data.classes,
        "class_index": {name: i for i, name in enumerate(data.classes)},
        "channels": data.channels,
        "resolution": data.resolution,
        "mean": list(data.mean),
        "std": list(data.std),
        "counts": {
            "train": len(data.train_y),
            "val": len(data.val_y),
            "train_per_class": data.class_counts("train"),
            "val_per_class": data.class_counts("val"),
        },
        "checksums": {DATA_FILE: file_digest(out_dir / DATA_FILE)},
        **extra_manifest,
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def load_prepared(data_dir: str | Path, *, verify: bool = False) -> PreparedData:
    """Loads a prepared dataset written by the ``prepare`` stage.

    Args:
        data_dir: ``data/<profile>``.
        verify: also check ``data.pt`` against the manifest's SHA-256.
    """
    data_dir = Path(data_dir)
    manifest = read_json(data_dir / MANIFEST_FILE)
    if manifest.get("lazy"):
        raise ValueError(
            f"{data_dir}: {manifest['dataset']} is prepared as a lazy index (too large to cache "
            "as tensors); open it with wmdd.data.load_data (or wmdd.data.lazy.load_lazy)"
        )
    if verify:
        digest = file_digest(data_dir / DATA_FILE)
        if digest != manifest["checksums"][DATA_FILE]:
            raise ValueError(f"{data_dir / DATA_FILE}: checksum does not match its manifest")
    keys = ("train_x", "train_y", "val_x", "val_y")
    loaded = load_artifact(data_dir / DATA_FILE, "prepared dataset", keys=keys, stage="prepare")
    tensors = {k: loaded[k] for k in keys}
    return PreparedData(
        name=manifest["dataset"],
        classes=list(manifest["classes"]),
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        **tensors,
    )


def is_lazy(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a lazy index (ImageNet-1K) rather than cached tensors."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run the prepare stage first)")
    return bool(read_json(path).get("lazy"))
