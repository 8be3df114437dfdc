"""Generic ImageFolder source: a directory or an archive with ``train/`` and ``val/`` (or
``test/``) folders of per-class sub-folders.

Accepted sources (``datasets.<profile>.data.source``):

* a directory ``ROOT`` with ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (``test/``
  is accepted in place of ``val/``), or with exactly one sub-directory that has them
  (as archives usually unpack, e.g. ``imagenette2-160/train``);
* an archive (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``) holding such a tree; it is unpacked
  safely (see :mod:`wmdd.data.archive`) into a temporary directory that is removed after
  the images are decoded.

Classes are the sorted names of the ``train`` sub-folders; the validation split must have
the same class folders. Images are decoded with Pillow, converted to RGB, resized so the
shorter side equals the resolution and centre-cropped (the evaluation preprocessing), and
cached as uint8 tensors.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from wmdd.config import DataConfig
from wmdd.data.archive import safe_extract
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset
from wmdd.utils import file_digest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

IMAGEFOLDER = DatasetInfo(
    name="imagefolder",
    channels=3,
    native_resolution=0,
    mean=None,
    std=None,
    description="any ImageFolder tree or archive with train/ and val/ (or test/)",
)


class LayoutError(ValueError):
    """A source does not have the expected directory layout."""


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def candidate_roots(path: Path) -> list[Path]:
    """Where a dataset's top level may be: ``path`` itself, then its single sub-directory
    (archives usually unpack to one folder; ``__MACOSX`` and hidden entries ignored)."""
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
    return [path] + (subdirs if len(subdirs) == 1 else [])


def listing(path: Path) -> list[str]:
    """The first 20 entries of ``path`` (folders with a trailing /), for layout errors."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:20]


def find_split_root(path: Path) -> tuple[Path, str]:
    """Locates the directory holding ``train/`` and ``val/`` (or ``test/``).

    Returns:
        The root and the name of its validation split (``"val"`` or ``"test"``).

    Raises:
        LayoutError: saying what was expected and what was found.
    """
    for root in candidate_roots(path):
        for val_name in ("val", "test"):
            if (root / "train").is_dir() and (root / val_name).is_dir():
                return root, val_name
    found = listing(path)
    raise LayoutError(
        f"{path}: expected train/ and val/ (or test/) folders of per-class sub-folders, "
        f"at the top level or inside a single sub-directory; found: {found or 'nothing'}"
    )


def list_split(
    split_dir: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Lists the images of one split: paths, labels and the class names."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    elif found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise LayoutError(
            f"{split_dir}: class folders differ from train/: missing {missing}, extra {extra}"
        )
    if not classes:
        raise LayoutError(f"{split_dir}: expected per-class sub-folders, found none")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise LayoutError(f"{split_dir / name}: expected images ({sorted(IMAGE_SUFFIXES)})")
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Decodes one image to RGB, resizes the shorter side and centre-crops: (3, H, W) uint8."""
    with Image.open(path) as opened:
        img = opened.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_images(
    paths: list[Path], labels: list[int], resolution: int, *, skip_corrupt: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decodes images in a small thread pool (Pillow releases the GIL while decoding).

    Raises:
        ValueError: naming the file, for an unreadable image (unless ``skip_corrupt``).
    """

    def load(path: Path) -> np.ndarray | None:
        try:
            return load_image(path, resolution)
        except Exception as err:  # Pillow raises many types for bad files
            if skip_corrupt:
                return None
            raise ValueError(
                f"cannot read image {path}: {err} (set data.skip_corrupt: true to skip "
                f"unreadable images; they are then counted in the manifest)"
            ) from None

    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(
            tqdm(pool.map(load, paths), total=len(paths), desc=desc, unit="img", disable=None)
        )
    kept = [i for i, a in enumerate(arrays) if a is not None]
    skipped = [str(paths[i]) for i, a in enumerate(arrays) if a is None]
    if not kept:
        raise ValueError(f"{desc}: no readable image among {len(paths)} files")
    x = torch.from_numpy(np.stack([arrays[i] for i in kept]))  # (N, 3, R, R)
    y = torch.tensor([labels[i] for i in kept], dtype=torch.long)
    return x, y, skipped


def read_tree(root: Path, cfg: DataConfig, *, default_resolution: int = 0) -> RawDataset:
    """Reads an extracted ImageFolder tree."""
    resolution = cfg.resolution or default_resolution
    if resolution <= 0:
        raise ValueError("data.resolution: expected a positive int for an image-folder dataset")
    split_root, val_name = find_split_root(root)
    train_paths, train_labels, classes = list_split(split_root / "train")
    val_paths, val_labels, _ = list_split(split_root / val_name, classes)
    skip = cfg.skip_corrupt
    train_x, train_y, skipped_t = decode_images(
        train_paths, train_labels, resolution, skip_corrupt=skip, desc="train"
    )
    val_x, val_y, skipped_v = decode_images(
        val_paths, val_labels, resolution, skip_corrupt=skip, desc=val_name
    )
    skipped = [str(Path(p).relative_to(root)) for p in skipped_t + skipped_v]
    return RawDataset(
        classes, train_x, train_y, val_x, val_y, skipped=tuple(skipped), val_split_name=val_name
    )


def resolve_local_source(cfg: DataConfig, workdir: Path) -> tuple[Path, str]:
    """Checks a local source path; unpacks an archive into ``workdir``.

    Returns:
        The directory to read and the SHA-256 of the archive ("" for a directory).
    """
    source = Path(cfg.source).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"data.source: {source} does not exist (expected a directory or an archive "
            f"{', '.join(ARCHIVE_SUFFIXES)}; relative paths are relative to the project root)"
        )
    if source.is_dir():
        return source, ""
    if not is_archive(source):
        raise LayoutError(
            f"data.source: {source} is a file but not a supported archive "
            f"({', '.join(ARCHIVE_SUFFIXES)})"
        )
    digest = file_digest(source)
    if cfg.sha256 and digest != cfg.sha256.lower():
        raise ValueError(
            f"data.source: {source} has SHA-256 {digest}, expected {cfg.sha256} (data.sha256)"
        )
    return safe_extract(source, workdir / "extracted"), digest


@register_dataset(IMAGEFOLDER)
def read_imagefolder(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Reads a generic ImageFolder directory or archive."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root, digest = resolve_local_source(cfg, Path(tmp))
        raw = read_tree(root, cfg)
    raw.source_sha256 = digest
    return raw
