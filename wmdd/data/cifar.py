"""CIFAR-10 from a local copy of the official pickled batches or of an ImageFolder tree.

Two source layouts are accepted (``data.source``), detected by what the source holds:

(a) The official ``cifar-10-python.tar.gz`` or its unpacked ``cifar-10-batches-py/``
    (or a directory holding exactly that one sub-directory)::

        cifar-10-batches-py/
            data_batch_1 .. data_batch_5   10,000 training images each
            test_batch                     10,000 test images
            batches.meta                   {b"label_names": [...], ...}

    Each batch is a pickled dict with ``b"data"``, a uint8 array ``(N, 3072)`` whose rows
    are the R, G and B planes of a 32x32 image, each plane row-major, and ``b"labels"``, a
    list of ``N`` ints in 0..9. A pickle can run arbitrary code when loaded, so the batches
    are read with an unpickler that resolves only the few numpy globals an array needs and
    refuses anything else (:class:`UnsafePickleError`, naming the file and the global).
(b) An ImageFolder copy ``ROOT/{train,test}/<class name>/*`` (e.g. PNG or JPEG files), a
    directory holding exactly one such ``ROOT``, or an archive of either; read with
    :func:`wmdd.data.folder.read_tree`. The class folders must be exactly the 10 CIFAR-10
    class names.

Classes are in the canonical CIFAR-10 order (:data:`CIFAR10_CLASSES`): for (a) they are
``batches.meta``'s ``label_names``, checked against that list; for (b) the folder names,
which sort into that order. The validation split is the test set (``"test"``). Images are
kept at 32x32 unless ``data.resolution`` says otherwise: then the pickled arrays are
resized with bilinear interpolation (antialiased, ``torch.nn.functional.interpolate``) and
rounded to uint8, and ImageFolder files are resized like any other image source (Pillow
bilinear), so the two layouts agree exactly only at 32 px. ``data.skip_corrupt`` applies
to ImageFolder files only; a damaged batch file is always an error. Normalisation uses the
mean/std of the DM code.
"""

from __future__ import annotations

import codecs
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from wmdd.config import DataConfig
from wmdd.data.folder import (
    LayoutError,
    candidate_roots,
    find_split_root,
    listing,
    read_tree,
    resolve_local_source,
)
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR10 = DatasetInfo(
    name="cifar10",
    channels=3,
    native_resolution=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
    description="CIFAR-10 (10 classes, 32x32; 50,000 train / 10,000 test images)",
)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)
_SIDE = 32
_ROW_LENGTH = 3 * _SIDE * _SIDE  # R plane, G plane, B plane, each row-major

# The only globals a pickled numpy array refers to (Python 2's cPickle wrote numpy.core;
# Python 3 protocol-2 pickles encode bytes with _codecs.encode).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): obj
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", _multiarray._reconstruct), ("scalar", _multiarray.scalar))
}
_ALLOWED_GLOBALS |= {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}

_LAYOUTS = (
    f"(a) the pickled batches of cifar-10-python.tar.gz ({', '.join(BATCH_FILES)}), "
    "or (b) train/ and test/ folders with one sub-folder per class name"
)


class UnsafePickleError(ValueError):
    """A batch file refers to a global that a pickled numpy array does not need."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/ints and numpy arrays; refuses every other global."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            allowed = sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle global {module}.{name}; a CIFAR-10 "
                f"batch holds only numpy arrays, lists and bytes (allowed globals: {allowed})"
            )
        return _ALLOWED_GLOBALS[(module, name)]


def unpickle_batch(path: Path) -> dict[str, Any]:
    """Loads one batch file with the restricted unpickler; keys are decoded to ``str``.

    Raises:
        UnsafePickleError: for any global other than numpy's array constructors.
        ValueError: naming the file, if it is not a pickled dict.
    """
    with path.open("rb") as f:
        try:
            obj = _NumpyOnlyUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # truncated or foreign files raise many types
            raise ValueError(f"cannot unpickle {path}: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One data batch -> images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    Raises:
        ValueError: naming the file and the key whose value is malformed.
    """
    batch = unpickle_batch(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise ValueError(f"{path}: expected keys b'data' and b'labels', missing {missing}")
    data, labels = batch["data"], batch["labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _ROW_LENGTH
    ):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(
            f"{path}: b'data': expected a uint8 array of shape (N, {_ROW_LENGTH}), found {found}"
        )
    y = np.array(labels) if isinstance(labels, list | np.ndarray) else np.array(None)
    if not (
        y.shape == (len(data),)
        and y.dtype.kind in "iu"
        and (len(y) == 0 or 0 <= y.min() <= y.max() < len(CIFAR10_CLASSES))
    ):
        raise ValueError(
            f"{path}: b'labels': expected a list of {len(data)} ints in "
            f"0..{len(CIFAR10_CLASSES) - 1}, found {type(labels).__name__} {y.dtype} {y.shape}"
        )
    images = data.reshape(-1, 3, _SIDE, _SIDE)  # (N, C, H, W): plane-major, rows then columns
    return images, y.astype(np.int64)


def read_label_names(path: Path) -> list[str]:
    """``batches.meta``'s ``label_names``, checked against :data:`CIFAR10_CLASSES`."""
    names = unpickle_batch(path).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise ValueError(f"{path}: b'label_names': expected a list of class names")
    decoded = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    if decoded != list(CIFAR10_CLASSES):
        raise LayoutError(
            f"{path}: label_names {decoded} differ from the CIFAR-10 classes "
            f"{list(CIFAR10_CLASSES)}"
        )
    return decoded


def resize_uint8(x: torch.Tensor, resolution: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``(N, C, H, W)`` uint8 images, rounded back to uint8."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    out = [
        F.interpolate(
            part.float(),
            size=(resolution, resolution),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for part in x.split(chunk)
    ]
    return torch.cat(out)  # (N, C, resolution, resolution)


def read_pickled(batches_dir: Path, resolution: int) -> RawDataset:
    """Reads ``cifar-10-batches-py/``: the 5 training batches and the test batch."""
    missing = [name for name in BATCH_FILES if not (batches_dir / name).is_file()]
    if missing:
        raise LayoutError(
            f"{batches_dir}: CIFAR-10 batch files missing: {missing} "
            f"(expected {', '.join(BATCH_FILES)})"
        )
    classes = read_label_names(batches_dir / META_FILE)
    train = [read_batch(batches_dir / name) for name in TRAIN_BATCHES]
    test_x, test_y = read_batch(batches_dir / TEST_BATCH)
    train_x = torch.from_numpy(np.concatenate([x for x, _ in train]))  # (50000, 3, 32, 32)
    train_y = torch.from_numpy(np.concatenate([y for _, y in train]))
    return RawDataset(
        classes,
        resize_uint8(train_x, resolution),
        train_y,
        resize_uint8(torch.from_numpy(test_x.copy()), resolution),
        torch.from_numpy(test_y),
        val_split_name="test",
    )


def find_batches_dir(path: Path) -> Path | None:
    """The directory holding CIFAR-10 batch files: ``path`` or its single sub-directory."""
    for root in candidate_roots(path):
        if any((root / name).is_file() for name in BATCH_FILES):
            return root
    return None


def check_class_folders(train_dir: Path) -> None:
    """Raises LayoutError unless ``train_dir``'s sub-folders are the 10 CIFAR-10 classes."""
    found = {p.name for p in train_dir.iterdir() if p.is_dir()}
    missing = [c for c in CIFAR10_CLASSES if c not in found]
    unexpected = sorted(found - set(CIFAR10_CLASSES))
    if missing or unexpected:
        raise LayoutError(
            f"{train_dir}: expected the 10 CIFAR-10 class folders {list(CIFAR10_CLASSES)}; "
            f"missing {missing}, unexpected {unexpected}"
        )


def read_cifar_tree(root: Path, cfg: DataConfig) -> RawDataset:
    """Detects layout (a) or (b) under ``root`` and reads it."""
    resolution = cfg.resolution or CIFAR10.native_resolution
    batches_dir = find_batches_dir(root)
    if batches_dir is not None:
        return read_pickled(batches_dir, resolution)
    try:
        split_root, _ = find_split_root(root)
    except LayoutError:
        found = listing(root)
        raise LayoutError(
            f"{root}: expected {_LAYOUTS}, at the top level or inside a single "
            f"sub-directory; found: {found or 'nothing'}"
        ) from None
    check_class_folders(split_root / "train")
    # The canonical order is alphabetical, so read_tree's sorted class folders follow it.
    raw = read_tree(root, cfg, default_resolution=CIFAR10.native_resolution)
    assert raw.classes == list(CIFAR10_CLASSES), raw.classes
    return raw


@register_dataset(CIFAR10)
def read_cifar10(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Reads CIFAR-10 from the official pickled batches or an ImageFolder copy."""
    if cfg.source in ("", "builtin"):
        raise ValueError(
            "data.source: set it to a local cifar-10-python.tar.gz (or its unpacked "
            f"cifar-10-batches-py/) or an ImageFolder copy with train/ and test/ "
            f"(got {cfg.source!r})"
        )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        source_dir, digest = resolve_local_source(cfg, Path(tmp))
        raw = read_cifar_tree(source_dir, cfg)
    raw.source_sha256 = digest
    return raw
