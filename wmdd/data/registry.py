"""Dataset registry: what a dataset is (classes, channels, resolution, normalisation) and how
its raw splits are read from a source.

A registered dataset provides a *reader*: ``read(cfg, workdir) -> RawDataset`` returning
the train and validation images as uint8 tensors at the configured resolution, plus the
class names in the dataset's canonical class order. ``wmdd.data.prepare`` turns that into
the versioned, prepared form every later stage reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from wmdd.config import DataConfig


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset."""

    name: str  # registry name
    channels: int  # image channels
    native_resolution: int  # side of the images as distributed (0 = varies)
    mean: tuple[float, ...] | None  # per-channel normalisation mean (None = computed at prepare)
    std: tuple[float, ...] | None  # per-channel normalisation std (None = computed at prepare)
    description: str  # one line for the manifest and the README


@dataclass
class RawDataset:
    """Decoded splits at the working resolution, as produced by a reader."""

    classes: list[str]  # class names, index = label
    train_x: Tensor  # (N_train, C, H, W) uint8
    train_y: Tensor  # (N_train,) int64
    val_x: Tensor  # (N_val, C, H, W) uint8
    val_y: Tensor  # (N_val,) int64
    source_sha256: str = ""  # checksum of the source archive/file, when there is one
    skipped: tuple[str, ...] = ()  # unreadable files skipped (only with skip_corrupt)
    val_split_name: str = "val"  # what the validation split is called in the source


Reader = Callable[[DataConfig, Path], RawDataset]


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    reader: Reader


_DATASETS: dict[str, _Entry] = {}


def register_dataset(info: DatasetInfo) -> Callable[[Reader], Reader]:
    """Decorator registering ``reader`` for the dataset described by ``info``."""

    def deco(reader: Reader) -> Reader:
        if info.name in _DATASETS:
            raise ValueError(f"dataset {info.name!r} is already registered")
        _DATASETS[info.name] = _Entry(info, reader)
        return reader

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> tuple[DatasetInfo, Reader]:
    """The info and reader of a registered dataset, or a ValueError listing valid names."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())}")
    entry = _DATASETS[name]
    return entry.info, entry.reader
