"""The embedded default dataset: scikit-learn's handwritten digits (UCI optdigits test set).

1,797 real 8x8 grey-scale images of the digits 0-9, shipped inside scikit-learn, so the
whole pipeline runs on a fresh machine with no download. Pixel values 0..16 are mapped to
0..255 and upsampled (bilinear) to the configured resolution; a seeded, stratified split
holds out ``val_fraction`` of the images as the validation split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from wmdd.config import DataConfig
from wmdd.data.registry import DatasetInfo, RawDataset, register_dataset

DIGITS = DatasetInfo(
    name="digits",
    channels=1,
    native_resolution=8,
    mean=None,  # computed from the training split at prepare time
    std=None,
    description="scikit-learn handwritten digits (1,797 real 8x8 images, 10 classes)",
)


def _to_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    x = images.float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


@register_dataset(DIGITS)
def read_digits(cfg: DataConfig, workdir: Path) -> RawDataset:
    """Reads the digits, splits them (stratified, seeded) and resizes them."""
    from sklearn.datasets import load_digits  # imported here: only prepare needs it
    from sklearn.model_selection import train_test_split

    del workdir
    if cfg.source != "builtin":
        raise ValueError(
            f"datasets.*.data.source: digits ships with scikit-learn; expected 'builtin', "
            f"got {cfg.source!r}"
        )
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: expected a value in (0, 1), got {cfg.val_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images)  # (1797, 8, 8) float64 in 0..16
    labels = torch.from_numpy(bunch.target).long()
    idx_train, idx_val = train_test_split(
        range(len(labels)),
        test_size=cfg.val_fraction,
        stratify=bunch.target,
        random_state=cfg.split_seed,
    )
    resolution = cfg.resolution or DIGITS.native_resolution
    x = _to_uint8(images, resolution)
    idx_train, idx_val = torch.tensor(sorted(idx_train)), torch.tensor(sorted(idx_val))
    return RawDataset(
        classes=[str(d) for d in range(10)],
        train_x=x[idx_train],
        train_y=labels[idx_train],
        val_x=x[idx_val],
        val_y=labels[idx_val],
    )
