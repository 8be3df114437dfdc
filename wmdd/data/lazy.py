"""Datasets too large to cache as tensors: an index of where each image lies, decoded lazily.

A *lazy* prepared dataset (``data/<profile>/``, written by e.g.
:func:`wmdd.data.imagenet.index_imagenet`) holds two small files instead of ``data.pt``:

* ``index.pt`` — one ``torch.save``'d dict::

      {"format": 1,
       "layout": "archives" | "folders",
       "classes": [name, ...],                  # index = label
       "archives": [file name, ...],            # relative to the source ("archives" only)
       "splits": {"train": {...}, "val": {...}}}

  where each split is ``{"labels": int64 (N,), "names": [str] * N}`` plus, for the
  ``archives`` layout, ``"archive"``, ``"offset"`` and ``"size"`` (int64 (N,) each): image
  ``i`` is the ``size[i]`` bytes at byte ``offset[i]`` of ``archives[archive[i]]``, and
  ``names[i]`` is its member name (for messages). For the ``folders`` layout ``names[i]`` is
  the image's path relative to the source directory.
* ``manifest.json`` — classes, counts, the source directory, the archives with their byte
  sizes and the SHA-256 of ``index.pt``.

:func:`load_lazy` turns that into one :class:`LazyImages` dataset per split. Reading an
image is one positioned read (``os.pread``) on an archive opened once per process, so
DataLoader workers each keep their own handles; decoding is
:func:`wmdd.data.folder.load_image` (RGB, shorter side resized to the resolution, centre
crop), exactly as for the cached datasets.

Example (on a CPU; nothing is decoded before ``gather`` or the loader asks)::

    >>> import torch
    >>> from wmdd.data.lazy import gather, load_lazy, make_loader
    >>> data = load_lazy("data/imagenet1k", resolution=64)  # doctest: +SKIP
    >>> x, y = gather(data.train, data.train.indices_of_class(0)[:10])  # doctest: +SKIP
    >>> loader = make_loader(data.val, 256, workers=2, device=torch.device("cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from wmdd.config import DataConfig
from wmdd.data.folder import load_image
from wmdd.data.prepared import PreparedData, TrainingImages, is_lazy, load_prepared
from wmdd.utils import file_digest, load_artifact, read_json, write_json

log = logging.getLogger(__name__)

INDEX_FILE = "index.pt"
MANIFEST_FILE = "manifest.json"
INDEX_FORMAT = 1
SPLITS = ("train", "val")

Layout = Literal["archives", "folders"]
T = TypeVar("T")
Sample = tuple[Tensor, int]


class CorruptImageError(ValueError):
    """An indexed image cannot be read or decoded."""


@dataclass
class SplitIndex:
    """Where the images of one split lie, built up one image at a time by an indexer."""

    labels: list[int] = field(default_factory=list)  # class index per image
    names: list[str] = field(default_factory=list)  # member name, or path relative to source
    archive: list[int] = field(default_factory=list)  # index into the archives ("archives")
    offset: list[int] = field(default_factory=list)  # byte offset in that archive
    size: list[int] = field(default_factory=list)  # byte size of the encoded image

    def add(self, label: int, name: str, location: tuple[int, int, int] | None = None) -> None:
        """Appends one image; ``location`` is (archive id, offset, size) for archives."""
        self.labels.append(label)
        self.names.append(name)
        if location is not None:
            self.archive.append(location[0])
            self.offset.append(location[1])
            self.size.append(location[2])

    def to_dict(self, layout: Layout) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": torch.tensor(self.labels, dtype=torch.long),
            "names": list(self.names),
        }
        if layout == "archives":
            for key in ("archive", "offset", "size"):
                out[key] = torch.tensor(getattr(self, key), dtype=torch.long)
        return out


def save_index(
    out_dir: Path,
    *,
    layout: Layout,
    classes: list[str],
    splits: dict[str, SplitIndex],
    source: Path,
    archives: dict[str, int],
    extra_manifest: dict[str, Any],
) -> dict[str, Any]:
    """Writes ``index.pt`` and ``manifest.json`` into ``out_dir``; returns the manifest.

    Args:
        out_dir: Output directory (the caller makes it atomic, see ``wmdd.utils.atomic_dir``).
        layout: ``"archives"`` (images read by byte offset) or ``"folders"`` (one file each).
        classes: Class names, index = label.
        splits: ``"train"`` and ``"val"`` indices.
        source: The source directory the names and archives are relative to.
        archives: Image archive name -> byte size, in archive-id order.
        extra_manifest: Further manifest entries (dataset, normalisation, label source...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {name: splits[name].to_dict(layout) for name in SPLITS}
    index = {
        "format": INDEX_FORMAT,
        "layout": layout,
        "classes": list(classes),
        "archives": list(archives),
        "splits": tables,
    }
    torch.save(index, out_dir / INDEX_FILE)
    counts: dict[str, Any] = {}
    for name in SPLITS:
        per_class = torch.bincount(tables[name]["labels"], minlength=len(classes))
        counts[name] = len(splits[name].labels)
        counts[f"{name}_per_class"] = per_class.tolist()
    manifest = {
        **extra_manifest,
        "lazy": True,
        "layout": layout,
        "source": str(source.resolve()),
        "archives": dict(archives),
        "classes": list(classes),
        "class_index": {name: i for i, name in enumerate(classes)},
        "num_classes": len(classes),
        "counts": counts,
        "checksums": {INDEX_FILE: file_digest(out_dir / INDEX_FILE)},
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


class _ArchiveFiles:
    """Read-only handles of the source archives, opened on first use in each process.

    A DataLoader worker gets a copy without handles (pickled) or notices that its process
    id changed (forked) and opens its own. Reads are positioned (``os.pread``): no file
    position is shared, so threads (``gather``) share the handles; a lock guards opening.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self._pid = -1
        self._files: dict[int, BinaryIO] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"])  # type: ignore[misc]  # a fresh, unopened copy

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Closes the handles (in a forked process, only that process's descriptors)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def _handle(self, archive: int) -> BinaryIO:
        with self._lock:
            if self._pid != os.getpid():
                self.close()
                self._pid = os.getpid()
            f = self._files.get(archive)
            if f is None:
                f = self._files[archive] = open(self.paths[archive], "rb", buffering=0)  # noqa: SIM115
            return f

    def read(self, archive: int, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` of archive ``archive`` (fewer at end of file)."""
        return os.pread(self._handle(archive).fileno(), size, offset)


class LazyImages(Dataset[Sample | None]):
    """One split of a lazy dataset: ``dataset[i]`` is ``(uint8 (3, R, R), label)``.

    With ``skip_corrupt`` an unreadable image yields ``None`` (logged) instead of raising;
    :func:`make_loader` and :func:`gather` drop such samples.
    """

    def __init__(
        self,
        *,
        split: str,
        classes: list[str],
        labels: Tensor,
        names: list[str],
        root: Path,
        resolution: int,
        locations: Tensor | None = None,
        files: _ArchiveFiles | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution: expected a positive int, got {resolution}")
        if (locations is None) != (files is None):
            raise ValueError("locations and files: give both (archives) or neither (folders)")
        self.split = split
        self.classes = classes
        self.labels = labels  # (N,) int64
        self.names = names  # member names or paths relative to root
        self.root = root
        self.resolution = resolution
        self.locations = locations  # (N, 3) int64: archive id, offset, size
        self.files = files
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample | None:
        try:
            return torch.from_numpy(self.decode(i)), int(self.labels[i])
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise CorruptImageError(
                    f"{err} (set data.skip_corrupt: true to skip unreadable images)"
                ) from None
            log.warning("skipping unreadable image: %s", err)
            return None

    def describe(self, i: int) -> str:
        """Where image ``i`` lies, for messages: the archive and member, or the file."""
        if self.locations is None or self.files is None:
            return str(self.root / self.names[i])
        archive = self.files.paths[int(self.locations[i, 0])]
        return f"{archive} member {self.names[i]!r}"

    def decode(self, i: int) -> np.ndarray:
        """Reads and decodes image ``i``: (3, R, R) uint8.

        Raises:
            CorruptImageError: naming the archive and member (or the file).
        """
        try:
            if self.locations is None or self.files is None:
                return load_image(self.root / self.names[i], self.resolution)
            archive, offset, size = (int(v) for v in self.locations[i])
            data = self.files.read(archive, offset, size)
            if len(data) != size:
                raise OSError(f"archive ends after {len(data)} of the indexed {size} bytes")
            # load_image opens whatever Image.open accepts; a file object avoids a copy on disk.
            return load_image(io.BytesIO(data), self.resolution)  # type: ignore[arg-type]
        except Exception as err:  # Pillow raises many types for bad data
            raise CorruptImageError(f"cannot read image {self.describe(i)}: {err}") from None

    def indices_of_class(self, c: int) -> Tensor:
        """Positions of the images of class ``c``, in dataset order: (n_c,) int64."""
        return torch.nonzero(self.labels == c).flatten()

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, indices: Tensor | Sequence[int]) -> LazyImages:
        """The images at ``indices`` (in that order), sharing this split's archive handles."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return LazyImages(
            split=self.split,
            classes=self.classes,
            labels=self.labels[idx],
            names=[self.names[i] for i in idx.tolist()],
            root=self.root,
            resolution=self.resolution,
            locations=None if self.locations is None else self.locations[idx],
            files=self.files,
            skip_corrupt=self.skip_corrupt,
        )


def default_workers() -> int:
    """Decoding workers when none are configured: the CPU cores, at most 8."""
    return min(8, os.cpu_count() or 1)


@dataclass
class LazySplitSet(TrainingImages):
    """A lazy prepared dataset: its class index, normalisation and one dataset per split.

    Implements :class:`wmdd.data.prepared.TrainingImages`, so every method runs on it:
    training images are decoded on demand, one class (or one sampled batch) at a time, by
    ``workers`` threads. Methods address training images by position, so a training image
    they ask for must decode even with ``skip_corrupt`` (that flag drops unreadable images
    from validation loaders only); the error names the archive member or file.
    """

    name: str  # registry name
    classes: list[str]  # class names, index = label
    mean: tuple[float, ...]  # per-channel normalisation mean (of [0, 1] pixels)
    std: tuple[float, ...]  # per-channel normalisation std
    train: LazyImages
    val: LazyImages
    manifest: dict[str, Any]
    # decoding threads (train_images) and loader processes (validation)
    workers: int = field(default_factory=default_workers)

    @property
    def resolution(self) -> int:
        return self.train.resolution

    @property
    def channels(self) -> int:
        return 3  # decoded as RGB

    def split(self, name: str) -> LazyImages:
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: expected one of {list(SPLITS)}")
        return self.train if name == "train" else self.val

    def class_counts(self, split: str = "train") -> list[int]:
        return self.split(split).class_counts()

    def train_indices_of_class(self, c: int) -> Tensor:
        return self.train.indices_of_class(c)

    def train_images(self, indices: Tensor) -> Tensor:
        """Decodes the training images at ``indices``: uint8 (n, 3, R, R), in that order.

        Raises:
            CorruptImageError: an image does not decode (named), whatever ``skip_corrupt``.
        """
        arrays = _map_threads(self.train.decode, indices, threads=self.workers)
        if not arrays:
            return torch.empty(0, 3, self.resolution, self.resolution, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))


def _check_archives(root: Path, archives: dict[str, int], manifest_path: Path) -> list[Path]:
    """The archive paths, after checking each exists with the byte size it was indexed at."""
    paths = []
    for name, size in archives.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: archive listed in {manifest_path} not found (pass source= if the "
                f"source directory moved)"
            )
        if path.stat().st_size != size:
            raise ValueError(
                f"{path}: {path.stat().st_size} bytes, but {manifest_path} indexed it at "
                f"{size} bytes; index the source again"
            )
        paths.append(path)
    return paths


def load_lazy(
    data_dir: str | Path,
    *,
    resolution: int,
    source: str | Path | None = None,
    skip_corrupt: bool = False,
    verify: bool = False,
    workers: int = 0,
) -> LazySplitSet:
    """Opens a lazy prepared dataset (nothing is decoded until an image is asked for).

    Args:
        data_dir: The directory holding ``index.pt`` and ``manifest.json``.
        resolution: Side of the square images returned.
        source: The source directory, when it is no longer where it was indexed.
        skip_corrupt: Yield ``None`` for unreadable images instead of raising.
        verify: Also check ``index.pt`` against the manifest's SHA-256.
        workers: Decoding threads / loader processes; 0 = :func:`default_workers`.

    Raises:
        FileNotFoundError: a file of the index or an archive is missing.
        ValueError: checksum, archive size or index format mismatch.
    """
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST_FILE
    manifest = read_json(manifest_path)
    if verify and file_digest(data_dir / INDEX_FILE) != manifest["checksums"][INDEX_FILE]:
        raise ValueError(f"{data_dir / INDEX_FILE}: checksum does not match its manifest")
    index = load_artifact(data_dir / INDEX_FILE, "lazy dataset index", stage="prepare")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(
            f"{data_dir / INDEX_FILE}: index format {index.get('format')!r}, expected "
            f"{INDEX_FORMAT}; index the source again"
        )
    root = Path(source if source is not None else manifest["source"])
    files = None
    if index["layout"] == "archives":
        files = _ArchiveFiles(_check_archives(root, manifest["archives"], manifest_path))
    classes = list(index["classes"])

    def split(name: str) -> LazyImages:
        entry = index["splits"][name]
        locations = None
        if files is not None:
            locations = torch.stack([entry["archive"], entry["offset"], entry["size"]], dim=1)
        return LazyImages(
            split=name,
            classes=classes,
            labels=entry["labels"],
            names=list(entry["names"]),
            root=root,
            resolution=resolution,
            locations=locations,
            files=files,
            skip_corrupt=skip_corrupt,
        )

    return LazySplitSet(
        name=manifest["dataset"],
        classes=classes,
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        train=split("train"),
        val=split("val"),
        manifest=manifest,
        workers=workers if workers > 0 else default_workers(),
    )


def load_data(data_dir: str | Path, cfg: DataConfig) -> PreparedData | LazySplitSet:
    """Opens the prepared dataset in ``data_dir``, cached tensors or a lazy index, as the
    stages after ``prepare`` read it (``cfg`` is the profile's ``data`` section: resolution,
    source directory, ``skip_corrupt`` and ``workers`` of a lazy dataset)."""
    if not is_lazy(data_dir):
        return load_prepared(data_dir)
    return load_lazy(
        data_dir,
        resolution=cfg.resolution,
        source=cfg.source or None,
        skip_corrupt=cfg.skip_corrupt,
        workers=cfg.workers,
    )


def collate_images(batch: list[Sample | None], *, resolution: int) -> tuple[Tensor, Tensor]:
    """Stacks samples into ``(x uint8 (B, 3, R, R), y int64 (B,))``, dropping ``None``."""
    kept = [s for s in batch if s is not None]
    if not kept:
        empty = torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.long)
    x = torch.stack([s[0] for s in kept])
    y = torch.tensor([s[1] for s in kept], dtype=torch.long)
    return x, y


def make_loader(
    dataset: LazyImages,
    batch_size: int,
    *,
    workers: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader of ``(x uint8, y)`` batches decoded by ``workers`` processes.

    The order depends only on ``shuffle`` and ``generator``, never on ``workers``.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=functools.partial(collate_images, resolution=dataset.resolution),
    )


def gather(
    dataset: LazyImages, indices: Tensor | Sequence[int], *, threads: int = 4
) -> tuple[Tensor, Tensor]:
    """Decodes just the images at ``indices`` (for subset picks and real-image init).

    Pillow releases the GIL while decoding, so a few threads help.

    Returns:
        ``x`` uint8 (n, 3, R, R) and ``y`` int64 (n,), in the order of ``indices``
        (unreadable images dropped when the dataset has ``skip_corrupt``).
    """
    samples = _map_threads(dataset.__getitem__, indices, threads=threads)
    return collate_images(samples, resolution=dataset.resolution)


def _map_threads(
    fn: Callable[[int], T], indices: Tensor | Sequence[int], *, threads: int
) -> list[T]:
    """``[fn(i) for i in indices]``, decoded by ``threads`` threads (Pillow releases the GIL)."""
    positions = torch.as_tensor(indices, dtype=torch.long).tolist()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(fn, positions))
