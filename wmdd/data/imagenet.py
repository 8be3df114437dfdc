"""ImageNet-1K (ILSVRC2012), prepared as an index of where each image lies and decoded lazily.

Its 1.28M training images are never decoded whole, never extracted into a DVC output and
never hashed one by one: :func:`index_imagenet` records, per image, its label and location
(an ``index.pt`` + ``manifest.json``, see :mod:`wmdd.data.lazy`), and
:func:`wmdd.data.lazy.load_lazy` decodes images on demand.

``data.source`` is one directory in either layout:

* **official archives** (read in place by byte offset, never extracted):

  - ``ILSVRC2012_img_train.tar``: an uncompressed tar of ``<wnid>.tar`` members, each an
    uncompressed tar of that class's JPEGs. An image's offset is that of its ``<wnid>.tar``
    member's data in the outer file plus its own data offset inside the inner tar;
  - ``ILSVRC2012_img_val.tar``: an uncompressed tar of the 50,000 flat validation JPEGs;
  - validation labels, from the first of: ``ILSVRC2012_devkit_t12.tar.gz`` (``data/meta.mat``
    maps ILSVRC2012_ID -> WNID for the 1000 leaf synsets; ``data/
    ILSVRC2012_validation_ground_truth.txt`` holds one ILSVRC2012_ID per validation image, in
    sorted file-name order), ``val_labels.txt`` (one ``<file name> <wnid>`` per line,
    whitespace or comma separated, file name with or without extension) or Kaggle's
    ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the wnid is the first
    token of PredictionString).

* **an extracted copy**: ``train/<wnid>/*.JPEG`` and either ``val/<wnid>/*`` or flat
  ``val/*.JPEG`` with one of the label files above in the source directory.

Every member of an archive read is checked first, as :mod:`wmdd.data.archive` does before
extracting: absolute paths, ``..`` components, links, sparse and special members are refused
(:class:`~wmdd.data.archive.UnsafeArchiveError` naming the archive and member), so the
offsets recorded always point at a regular member's own bytes.

Classes are the training wnids in sorted order, the index order of torchvision's pretrained
ImageNet weights; training images are ordered by class, then member/file name; validation
images by file name. Fewer than 1000 classes are accepted (tiny test fixtures) and the count
is recorded in the manifest; every validation wnid must be a training class.

Example::

    python -c "from pathlib import Path; from wmdd.data.imagenet import index_imagenet; \\
        index_imagenet(Path('/datasets/ILSVRC2012'), Path('data/imagenet1k'))"
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import logging
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import scipy.io
from tqdm import tqdm

from wmdd.config import DataConfig
from wmdd.data.archive import (
    CorruptArchiveError,
    UnsafeArchiveError,
    _has_dotdot,
    _is_absolute,
)
from wmdd.data.folder import IMAGE_SUFFIXES, LayoutError, list_split, listing
from wmdd.data.imagenette import IMAGENET_MEAN, IMAGENET_STD
from wmdd.data.lazy import Layout, SplitIndex, save_index
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset

log = logging.getLogger(__name__)

LAZY = True  # prepared with index_imagenet and read with wmdd.data.lazy.load_lazy
NUM_CLASSES = 1000  # of the full dataset; recorded, not required (tiny fixtures have fewer)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
VAL_LABELS_TXT = "val_labels.txt"
VAL_LABELS_CSV = "LOC_val_solution.csv"
LABEL_FILES = (DEVKIT, VAL_LABELS_TXT, VAL_LABELS_CSV)  # in order of preference
META_MAT = ("data", "meta.mat")  # last path components inside the devkit
GROUND_TRUTH = ("data", "ILSVRC2012_validation_ground_truth.txt")

IMAGENET1K = DatasetInfo(
    name="imagenet1k",
    channels=3,
    native_resolution=0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description="ImageNet-1K / ILSVRC2012 (1000 classes; 1,281,167 train / 50,000 val)",
)

Location = tuple[str, int, int]  # member name, absolute byte offset, byte size


@register_dataset(IMAGENET1K)
def read_imagenet1k(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Refuses: ImageNet-1K is too large to decode into tensors; it is indexed instead."""
    raise ValueError(
        f"imagenet1k is prepared lazily: index data.source ({cfg.source!r}) with "
        f"wmdd.data.imagenet.index_imagenet and read it with wmdd.data.lazy.load_lazy; its "
        f"images are never decoded whole into memory"
    )


def index_imagenet(
    source: Path,
    out_dir: Path,
    *,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Indexes an ImageNet-1K source directory into ``out_dir`` (``index.pt``, ``manifest.json``).

    Args:
        source: The directory holding the official archives or an extracted copy.
        out_dir: Output directory; the caller makes it atomic (``wmdd.utils.atomic_dir``).
        progress: Show progress bars.
        extra_manifest: Further manifest entries from the caller (the prepare stage's
            config, resolution...), written with the index in one go.

    Returns:
        The manifest.

    Raises:
        LayoutError: the source has neither layout, or its labels do not fit its images.
        UnsafeArchiveError: an archive member is absolute, has ``..``, is a link or special.
        CorruptArchiveError: an archive is truncated or unreadable.
    """
    source = Path(source).expanduser()
    layout = detect_layout(source)
    if layout == "archives":
        classes, splits, labels_info = _index_archives(source, progress=progress)
        archives = {name: (source / name).stat().st_size for name in (TRAIN_TAR, VAL_TAR)}
    else:
        classes, splits, labels_info = _index_folders(source)
        archives = {}
    if len(classes) != NUM_CLASSES:
        log.warning(
            "%s: %d classes (the full ImageNet-1K has %d)", source, len(classes), NUM_CLASSES
        )
    manifest = save_index(
        out_dir,
        layout=layout,
        classes=classes,
        splits=splits,
        source=source,
        archives=archives,
        extra_manifest={
            "dataset": IMAGENET1K.name,
            "description": IMAGENET1K.description,
            "channels": IMAGENET1K.channels,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "val_split_name": "val",
            "val_labels": labels_info,
            **(extra_manifest or {}),
        },
    )
    log.info(
        "indexed %s (%s): %d classes, %d train / %d val images",
        source,
        layout,
        len(classes),
        manifest["counts"]["train"],
        manifest["counts"]["val"],
    )
    return manifest


def detect_layout(source: Path) -> Layout:
    """``"archives"`` when the official train tar is there, else ``"folders"``.

    Raises:
        LayoutError: saying what was expected and what was found.
    """
    if not source.is_dir():
        raise LayoutError(f"data.source: {source} is not a directory (expected ImageNet-1K's)")
    if (source / TRAIN_TAR).is_file():
        if not (source / VAL_TAR).is_file():
            raise LayoutError(f"{source}: found {TRAIN_TAR} but not {VAL_TAR} beside it")
        return "archives"
    if (source / "train").is_dir() and (source / "val").is_dir():
        return "folders"
    found = listing(source)
    raise LayoutError(
        f"{source}: expected either {TRAIN_TAR} + {VAL_TAR} + validation labels "
        f"({' or '.join(LABEL_FILES)}), or extracted train/<wnid>/ and val/ folders; "
        f"found: {found or 'nothing'}"
    )


# -- reading tar archives in place -------------------------------------------------------


class _Window(io.RawIOBase):
    """Read-only view of bytes ``[start, start + length)`` of an open file, as a file.

    Lets ``tarfile`` list a nested tar inside the outer one without copying it out.
    """

    def __init__(self, f: io.BufferedIOBase, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise OSError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turns tar read errors into a :class:`CorruptArchiveError` naming ``what``."""
    try:
        yield
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptArchiveError(
            f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from exc


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _check_member(archive: Path, info: tarfile.TarInfo, shown: str, end: int | None = None) -> bool:
    """Whether ``info`` is a regular file to read (False: a directory, skipped).

    Args:
        archive: The archive file, for messages.
        info: The member.
        shown: Its name as messages show it (``<wnid>.tar/<member>`` when nested).
        end: Size of the tar it is in, when known: the member's data must lie inside.

    Raises:
        UnsafeArchiveError: absolute path, ``..``, link, sparse or special member.
        CorruptArchiveError: the member's data runs past the end of its tar.
    """
    reason = ""
    if _is_absolute(info.name):
        reason = "has an absolute path"
    elif _has_dotdot(info.name):
        reason = "has a '..' path component"
    elif info.issym() or info.islnk():
        reason = f"is a link (to {info.linkname!r}); only regular files are read"
    elif info.isdir():
        return False
    elif not info.isreg() or info.issparse():
        reason = f"is not a regular file (tar type {info.type!r})"
    if reason:
        raise UnsafeArchiveError(f"refusing to index {archive}: member {shown!r} {reason}")
    if end is not None and info.offset_data + info.size > end:
        raise CorruptArchiveError(
            f"{archive}: member {shown!r} claims {info.size} bytes at offset "
            f"{info.offset_data}, past the end of its tar ({end} bytes)"
        )
    return True


def _image_members(
    archive: Path, members: Iterable[tarfile.TarInfo], *, base: int, end: int, prefix: str = ""
) -> list[Location]:
    """The image members of a tar with their absolute offsets, sorted by name.

    Args:
        archive: The file on disk, for messages.
        members: The members of the tar (the whole archive or a window on a nested member).
        base: Offset in ``archive`` of the first byte of the tar they belong to.
        end: Size of that tar.
        prefix: Prepended to member names in messages (``<wnid>.tar/``).
    """
    found = []
    for info in members:
        shown = prefix + info.name
        if _check_member(archive, info, shown, end) and _is_image(info.name):
            found.append((info.name, base + info.offset_data, info.size))
    return sorted(found)


def _index_train_tar(archive: Path, *, progress: bool) -> dict[str, list[Location]]:
    """wnid -> images of the nested training tar, listed in place."""
    per_class: dict[str, list[Location]] = {}
    end = archive.stat().st_size
    with (
        open(archive, "rb") as f,
        _reading(str(archive)),
        tarfile.open(fileobj=f, mode="r:") as outer,
    ):
        bar = tqdm(outer, desc="index train", unit="class", disable=None if progress else True)
        for info in bar:
            if not _check_member(archive, info, info.name, end):
                continue
            parts = PurePosixPath(info.name).parts
            if len(parts) != 1 or not info.name.endswith(".tar"):
                raise LayoutError(
                    f"{archive}: expected only <wnid>.tar members at the top level, "
                    f"found {info.name!r}"
                )
            wnid = parts[0][: -len(".tar")]
            if wnid in per_class:
                raise LayoutError(f"{archive}: member {info.name!r} is stored twice")
            window = _Window(f, info.offset_data, info.size)
            with (
                _reading(f"{archive} member {info.name!r}"),
                tarfile.open(fileobj=window, mode="r:") as inner,
            ):
                images = _image_members(
                    archive, inner, base=info.offset_data, end=info.size, prefix=info.name + "/"
                )
            if not images:
                raise LayoutError(f"{archive}: member {info.name!r} holds no images")
            per_class[wnid] = [(f"{info.name}/{n}", o, s) for n, o, s in images]
    if not per_class:
        raise LayoutError(f"{archive}: expected <wnid>.tar members, found none")
    return per_class


def _index_val_tar(archive: Path, *, progress: bool) -> list[Location]:
    """The validation images of the flat validation tar, sorted by file name."""
    end = archive.stat().st_size
    with _reading(str(archive)), tarfile.open(archive, mode="r:") as tar:
        members = tqdm(tar, desc="index val", unit="img", disable=None if progress else True)
        images = _image_members(archive, members, base=0, end=end)
    if not images:
        raise LayoutError(f"{archive}: expected validation images, found none")
    return sorted(images, key=lambda loc: PurePosixPath(loc[0]).name)


def _read_devkit(devkit: Path) -> tuple[bytes, bytes]:
    """The bytes of ``data/meta.mat`` and the ground-truth file, read without extracting."""
    wanted = {META_MAT: b"", GROUND_TRUTH: b""}
    with _reading(str(devkit)), tarfile.open(devkit, mode="r:gz") as tar:
        for info in tar:
            if not _check_member(devkit, info, info.name):
                continue
            key = PurePosixPath(info.name).parts[-2:]
            if key in wanted:
                f = tar.extractfile(info)
                assert f is not None  # a checked regular file
                wanted[key] = f.read()
    for key, data in wanted.items():
        if not data:
            raise LayoutError(f"{devkit}: expected a member {'/'.join(key)}, found none")
    return wanted[META_MAT], wanted[GROUND_TRUTH]


# -- validation labels -------------------------------------------------------------------


def _stem(name: str) -> str:
    """A validation file name without directory and image extension (the label key)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return base[: -len(PurePosixPath(base).suffix)] if _is_image(base) else base


def leaf_synsets(meta: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the leaf synsets (``num_children == 0``) of a ``meta.mat``."""
    try:
        mat = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)
    except Exception as err:  # scipy raises several types for a bad .mat
        raise LayoutError(f"{where}: cannot read as a MATLAB file ({err})") from None
    if "synsets" not in mat:
        raise LayoutError(f"{where}: expected a 'synsets' variable, found {sorted(mat)}")
    synsets = np.atleast_1d(mat["synsets"])  # squeeze_me turns one synset into a 0-d array
    fields = {"ILSVRC2012_ID", "WNID", "num_children"}
    if not fields <= set(synsets.dtype.names or ()):
        raise LayoutError(
            f"{where}: 'synsets' needs fields {sorted(fields)}, found {synsets.dtype.names}"
        )
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _devkit_labels(devkit: Path, names: list[str]) -> dict[str, str]:
    """Label key -> wnid from the devkit, for ``names`` in sorted file-name order."""
    meta, truth = _read_devkit(devkit)
    where = f"{devkit} member {'/'.join(GROUND_TRUTH)}"
    leaves = leaf_synsets(meta, f"{devkit} member {'/'.join(META_MAT)}")
    lines = [line for line in truth.decode("ascii", "replace").splitlines() if line.strip()]
    if len(lines) != len(names):
        raise LayoutError(
            f"{where}: expected one ILSVRC2012_ID per validation image ({len(names)}), "
            f"found {len(lines)} lines"
        )
    labels = {}
    for number, (line, name) in enumerate(zip(lines, names, strict=True), start=1):
        if not line.strip().isdigit() or int(line) not in leaves:
            raise LayoutError(
                f"{where}: line {number} ({name}) is {line.strip()!r}, expected one of the "
                f"{len(leaves)} leaf ILSVRC2012_IDs of {'/'.join(META_MAT)}"
            )
        labels[_stem(name)] = leaves[int(line)]
    return labels


def _text_labels(path: Path) -> dict[str, str]:
    """Label key -> wnid from ``val_labels.txt`` (``<file name> <wnid>`` per line)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if len(tokens) != 2:
            raise LayoutError(f"{path}: line {number} is {line!r}, expected '<file name> <wnid>'")
        pairs.append((tokens[0], tokens[1], number))
    return _label_dict(path, pairs)


def _csv_labels(path: Path) -> dict[str, str]:
    """Label key -> wnid from Kaggle's ``LOC_val_solution.csv``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not {"ImageId", "PredictionString"} <= set(header):
            raise LayoutError(
                f"{path}: expected the header 'ImageId,PredictionString', found {header}"
            )
        pairs = []
        for number, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not row["ImageId"] or not tokens:
                raise LayoutError(f"{path}: line {number} has no ImageId or no wnid: {row}")
            pairs.append((row["ImageId"], tokens[0], number))
    return _label_dict(path, pairs)


def _label_dict(path: Path, pairs: list[tuple[str, str, int]]) -> dict[str, str]:
    """Label key -> wnid, refusing an image labelled twice with different wnids."""
    labels: dict[str, str] = {}
    for name, wnid, number in pairs:
        key = _stem(name)
        if labels.setdefault(key, wnid) != wnid:
            raise LayoutError(
                f"{path}: line {number} labels {name} {wnid!r}, an earlier line {labels[key]!r}"
            )
    return labels


def _val_labels(source: Path, names: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Label key -> wnid for the flat validation ``names`` (sorted), and where it came from."""
    for file in LABEL_FILES:
        path = source / file
        if path.is_file():
            break
    else:
        found = sorted(p.name for p in source.iterdir())[:20]
        raise LayoutError(
            f"{source}: flat validation images need labels: expected one of "
            f"{list(LABEL_FILES)}, found: {found}"
        )
    if file == DEVKIT:
        labels = _devkit_labels(path, names)
    elif file == VAL_LABELS_TXT:
        labels = _text_labels(path)
    else:
        labels = _csv_labels(path)
    return labels, {"file": file, "bytes": path.stat().st_size}


def _label_val(
    names: list[str], labels: dict[str, str], classes: list[str], label_file: str
) -> list[int]:
    """The class index of each validation image, checking every wnid is a training class."""
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    out = []
    for name in names:
        wnid = labels.get(_stem(name))
        if wnid is None:
            raise LayoutError(f"{label_file}: expected a label for validation image {name}")
        if wnid not in class_index:
            raise LayoutError(
                f"{label_file}: validation image {name} is labelled {wnid!r}, which is not "
                f"one of the {len(classes)} training classes"
            )
        out.append(class_index[wnid])
    return out


def _check_unique_stems(where: str, names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(_stem(name), name)
        if other != name:
            raise LayoutError(f"{where}: validation images {other} and {name} share a name")


# -- the two layouts ---------------------------------------------------------------------


def _index_archives(
    source: Path, *, progress: bool
) -> tuple[list[str], dict[str, SplitIndex], dict[str, Any]]:
    """Classes, split indices and label provenance of the official archives."""
    per_class = _index_train_tar(source / TRAIN_TAR, progress=progress)
    classes = sorted(per_class)
    train = SplitIndex()
    for label, wnid in enumerate(classes):
        for name, offset, size in per_class[wnid]:
            train.add(label, name, (0, offset, size))
    images = _index_val_tar(source / VAL_TAR, progress=progress)
    names = [name for name, _, _ in images]
    _check_unique_stems(str(source / VAL_TAR), names)
    labels, info = _val_labels(source, names)
    val = SplitIndex()
    val_labels = _label_val(names, labels, classes, str(source / info["file"]))
    for label, (name, offset, size) in zip(val_labels, images, strict=True):
        val.add(label, name, (1, offset, size))
    return classes, {"train": train, "val": val}, info


def _index_folders(source: Path) -> tuple[list[str], dict[str, SplitIndex], dict[str, Any]]:
    """Classes, split indices and label provenance of an extracted copy."""
    paths, labels, classes = list_split(source / "train")
    train = SplitIndex()
    for path, label in zip(paths, labels, strict=True):
        train.add(label, path.relative_to(source).as_posix())
    val_dir = source / "val"
    entries = sorted(val_dir.iterdir())
    if any(p.is_dir() for p in entries):
        loose = [p.name for p in entries if not p.is_dir() and _is_image(p.name)]
        if loose:
            raise LayoutError(
                f"{val_dir}: expected either per-class sub-folders or flat images, found "
                f"both (e.g. {loose[0]})"
            )
        val_paths, val_labels, _ = list_split(val_dir, classes)
        pairs = sorted(zip(val_paths, val_labels, strict=True), key=lambda p: p[0].name)
        info: dict[str, Any] = {"folders": "val/<wnid>/"}
    else:
        flat = sorted((p for p in entries if _is_image(p.name)), key=lambda p: p.name)
        if not flat:
            raise LayoutError(f"{val_dir}: expected validation images, found none")
        names = [p.name for p in flat]
        mapping, info = _val_labels(source, names)
        flat_labels = _label_val(names, mapping, classes, str(source / info["file"]))
        pairs = list(zip(flat, flat_labels, strict=True))
    _check_unique_stems(str(val_dir), [p.name for p, _ in pairs])
    val = SplitIndex()
    for path, label in pairs:
        val.add(label, path.relative_to(source).as_posix())
    return classes, {"train": train, "val": val}, info
