"""Imagenette (fast.ai's 10-class ImageNet subset) from a local copy of an official archive.

The official archives (``imagenette2.tgz``, ``imagenette2-320.tgz``, ``imagenette2-160.tgz``
from fast.ai's S3 bucket) unpack to ``imagenette2*/{train,val}/<wnid>/*.JPEG`` (9,469 train
and 3,925 val images). Point ``data.source`` at the archive or the unpacked directory.
Classes are the 10 WordNet ids in sorted order (the ImageNet-1K index order restricted to
these classes); images are normalised with the ImageNet mean/std, as the teachers of the
SRe2L/WMDD lineage are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from wmdd.config import DataConfig
from wmdd.data.folder import LayoutError, read_tree, resolve_local_source
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

IMAGENETTE = DatasetInfo(
    name="imagenette",
    channels=3,
    native_resolution=0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description="Imagenette v2 (10 ImageNet classes; 9,469 train / 3,925 val images)",
)


@register_dataset(IMAGENETTE)
def read_imagenette(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Reads an Imagenette archive or directory and checks its 10 class folders."""
    if cfg.source in ("", "builtin"):
        raise ValueError(
            "data.source: set it to a local imagenette2*.tgz archive or its unpacked directory"
        )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root, digest = resolve_local_source(cfg, Path(tmp))
        raw = read_tree(root, cfg)
    if sorted(raw.classes) != sorted(IMAGENETTE_CLASSES):
        raise LayoutError(
            f"data.source {cfg.source}: expected the 10 Imagenette class folders "
            f"{sorted(IMAGENETTE_CLASSES)}, found {raw.classes}"
        )
    raw.source_sha256 = digest
    return raw
