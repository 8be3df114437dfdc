"""Tiny-ImageNet-200 (CS231n) from a local copy of the official ``tiny-imagenet-200.zip``.

The official archive unpacks to::

    tiny-imagenet-200/
        wnids.txt                     one WordNet id per line: the 200 classes
        words.txt                     wnid -> words (not read)
        train/<wnid>/images/*.JPEG    500 images per class (64x64)
        train/<wnid>/<wnid>_boxes.txt bounding boxes (not read)
        val/images/*.JPEG             10,000 images, 50 per class
        val/val_annotations.txt       filename <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
        test/                         unlabelled (not read; may be absent)

Point ``data.source`` at the zip, at the unpacked ``tiny-imagenet-200/`` directory or at a
directory holding exactly that one sub-directory. The class order (label ``k``) is the order
of the lines of ``wnids.txt`` -- not the sorted wnids -- as in the data loaders of the
SRe2L/WMDD code. Per-class image counts are not fixed (a subset with fewer training images
per class is read the same way), but every class needs at least one training image.
Validation labels come from ``val_annotations.txt``; every annotated image must exist and
every image in ``val/images`` must be annotated. Images are decoded like the other readers
(:func:`wmdd.data.folder.decode_images`) at ``data.resolution`` (default 64, the native
size); files skipped with ``data.skip_corrupt`` are recorded relative to
``tiny-imagenet-200/``. The normalisation is the Tiny-ImageNet mean/std of SRe2L/WMDD.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from wmdd.config import DataConfig
from wmdd.data.folder import (
    IMAGE_SUFFIXES,
    LayoutError,
    candidate_roots,
    decode_images,
    listing,
    resolve_local_source,
)
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset

TINY_IMAGENET = DatasetInfo(
    name="tiny_imagenet",
    channels=3,
    native_resolution=64,
    mean=(0.4802, 0.4481, 0.3975),
    std=(0.2302, 0.2265, 0.2262),
    description="Tiny-ImageNet-200 (200 ImageNet classes, 64x64; 100,000 train / 10,000 val)",
)

WNIDS_FILE = "wnids.txt"
VAL_ANNOTATIONS = "val/val_annotations.txt"
_ANNOTATION_FIELDS = "filename, wnid, x0, y0, x1, y1"


def find_tiny_root(path: Path) -> Path:
    """Locates ``tiny-imagenet-200/``: ``path`` itself or its single sub-directory.

    Raises:
        LayoutError: saying what was expected and what was found.
    """
    for root in candidate_roots(path):
        if (root / WNIDS_FILE).is_file():
            return root
    found = listing(path)
    raise LayoutError(
        f"{path}: expected the tiny-imagenet-200/ layout ({WNIDS_FILE}, train/<wnid>/images/, "
        f"val/images/ and {VAL_ANNOTATIONS}), at the top level or inside a single "
        f"sub-directory; found: {found or 'nothing'}"
    )


def read_wnids(path: Path) -> list[str]:
    """The class wnids in file order (blank lines ignored).

    Raises:
        LayoutError: for a missing or empty file, or a repeated wnid.
    """
    if not path.is_file():
        raise LayoutError(f"{path}: expected the list of class wnids, one per line; not found")
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    wnids = [w for w in wnids if w]
    if not wnids:
        raise LayoutError(f"{path}: expected one wnid per line, found none")
    repeated = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if repeated:
        raise LayoutError(f"{path}: expected unique wnids, found repeated {repeated}")
    return wnids


def list_train(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Lists ``train/<wnid>/images/*`` with labels = positions in ``wnids``.

    Raises:
        LayoutError: if the class folders differ from ``wnids`` or a class has no image.
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise LayoutError(f"{train_dir}: expected train/<wnid>/images/ folders; not found")
    found = {p.name for p in train_dir.iterdir() if p.is_dir()}
    missing = [w for w in wnids if w not in found]
    unexpected = sorted(found - set(wnids))
    if missing or unexpected:
        raise LayoutError(
            f"{train_dir}: class folders differ from {root / WNIDS_FILE}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = train_dir / wnid / "images"
        files = (
            sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if images_dir.is_dir()
            else []
        )
        if not files:
            raise LayoutError(f"{images_dir}: expected the training images of {wnid}, found none")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _parse_annotation(path: Path, lineno: int, line: str) -> tuple[str, str]:
    """One line of ``val_annotations.txt`` -> (filename, wnid)."""
    fields = line.split("\t")
    well_formed = (
        len(fields) == 6
        and fields[0] not in ("", ".", "..")
        and "/" not in fields[0]
        and "\\" not in fields[0]
        and fields[1] != ""
        and all(f.strip().isdigit() for f in fields[2:])
    )
    if not well_formed:
        raise LayoutError(
            f"{path}, line {lineno}: expected 6 tab-separated fields ({_ANNOTATION_FIELDS}) "
            f"with a plain file name and integer box corners, found {line!r}"
        )
    return fields[0], fields[1]


def read_val_annotations(path: Path, wnids: list[str]) -> list[tuple[str, str]]:
    """The (filename, wnid) pairs of ``val_annotations.txt``, in file order.

    Raises:
        LayoutError: naming the file and line of a malformed line, an unknown wnid or a
            file annotated twice.
    """
    if not path.is_file():
        raise LayoutError(f"{path}: expected the validation labels ({_ANNOTATION_FIELDS})")
    known = set(wnids)
    first_line: dict[str, int] = {}
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        filename, wnid = _parse_annotation(path, lineno, line)
        if wnid not in known:
            raise LayoutError(
                f"{path}, line {lineno}: wnid {wnid!r} of {filename} is not listed in {WNIDS_FILE}"
            )
        if filename in first_line:
            raise LayoutError(
                f"{path}, line {lineno}: {filename} is annotated again "
                f"(first on line {first_line[filename]})"
            )
        first_line[filename] = lineno
        rows.append((filename, wnid))
    if not rows:
        raise LayoutError(f"{path}: expected one annotation per validation image, found none")
    return rows


def list_val(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Lists ``val/images/*`` in annotation order with their annotated labels.

    Raises:
        LayoutError: if an annotated image is missing or an image is not annotated.
    """
    images_dir = root / "val" / "images"
    if not images_dir.is_dir():
        raise LayoutError(f"{images_dir}: expected the validation images; not found")
    annotations_path = root / VAL_ANNOTATIONS
    rows = read_val_annotations(annotations_path, wnids)
    absent = [name for name, _ in rows if not (images_dir / name).is_file()]
    if absent:
        raise LayoutError(
            f"{annotations_path}: {len(absent)} annotated images not found in {images_dir}, "
            f"e.g. {absent[:5]}"
        )
    annotated = {name for name, _ in rows}
    unannotated = sorted(
        p.name
        for p in images_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in annotated
    )
    if unannotated:
        raise LayoutError(
            f"{images_dir}: {len(unannotated)} images have no line in {annotations_path}, "
            f"e.g. {unannotated[:5]}"
        )
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    return [images_dir / name for name, _ in rows], [label_of[wnid] for _, wnid in rows]


def read_tiny_tree(root: Path, cfg: DataConfig) -> RawDataset:
    """Checks and decodes an unpacked ``tiny-imagenet-200/`` directory."""
    resolution = cfg.resolution or TINY_IMAGENET.native_resolution
    wnids = read_wnids(root / WNIDS_FILE)
    train_paths, train_labels = list_train(root, wnids)
    val_paths, val_labels = list_val(root, wnids)
    skip = cfg.skip_corrupt
    train_x, train_y, skipped_t = decode_images(
        train_paths, train_labels, resolution, skip_corrupt=skip, desc="train"
    )
    val_x, val_y, skipped_v = decode_images(
        val_paths, val_labels, resolution, skip_corrupt=skip, desc="val"
    )
    skipped = [str(Path(p).relative_to(root)) for p in skipped_t + skipped_v]
    return RawDataset(
        wnids, train_x, train_y, val_x, val_y, skipped=tuple(skipped), val_split_name="val"
    )


@register_dataset(TINY_IMAGENET)
def read_tiny_imagenet(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Reads Tiny-ImageNet-200 from ``tiny-imagenet-200.zip`` or its unpacked directory."""
    if cfg.source in ("", "builtin"):
        raise ValueError(
            "data.source: set it to a local tiny-imagenet-200.zip archive or its unpacked "
            f"directory (got {cfg.source!r})"
        )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        source_dir, digest = resolve_local_source(cfg, Path(tmp))
        raw = read_tiny_tree(find_tiny_root(source_dir), cfg)
    raw.source_sha256 = digest
    return raw
