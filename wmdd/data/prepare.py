"""The prepare step: read a dataset from its source and write its prepared, versioned form."""

from __future__ import annotations

import logging
from pathlib import Path

from wmdd.config import DataConfig, to_dict
from wmdd.data.imagenet import index_imagenet
from wmdd.data.prepared import PreparedData, channel_stats, save_prepared
from wmdd.data.registry import get_dataset
from wmdd.data.sources import fetch_source

log = logging.getLogger(__name__)


def _check_raw(raw, name: str) -> None:
    for split, x, y in (("train", raw.train_x, raw.train_y), ("val", raw.val_x, raw.val_y)):
        if x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"{name}: reader returned malformed {split} tensors {tuple(x.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= len(raw.classes):
            raise ValueError(f"{name}: {split} labels outside 0..{len(raw.classes) - 1}")


_DOWNLOAD_KEYS = ("archive", "url", "download_dir")

# Datasets too large to cache as tensors: prepared as an index, decoded lazily
# (wmdd.data.lazy). Their manifests carry ``"lazy": true``.
LAZY_INDEXERS = {"imagenet1k": index_imagenet}


def _prepare_lazy(cfg: DataConfig, resolved: DataConfig, out_dir: Path, *, progress: bool) -> dict:
    if resolved.source in ("", "builtin"):
        raise ValueError(
            f"data.source: {cfg.name} has no public download; set it to the directory "
            "holding the ILSVRC2012 archives or the extracted train/ and val/ folders"
        )
    if cfg.resolution <= 0:
        raise ValueError(f"data.resolution: expected a positive int for {cfg.name}")
    extra = {
        "config": _manifest_config(cfg),
        "resolution": cfg.resolution,
        "skipped": {"count": 0, "files": []},  # unreadable images surface when decoded
    }
    return LAZY_INDEXERS[cfg.name](
        Path(resolved.source), out_dir, progress=progress, extra_manifest=extra
    )


def _manifest_config(cfg: DataConfig) -> dict:
    """The data config for the manifest; the download keys only for a downloaded source
    (a local copy's manifest, and so its DVC hash, does not change with them), and never
    ``workers`` (how many processes decode changes no image)."""
    config = to_dict(cfg)
    config.pop("workers")
    if cfg.source != "download":
        for key in _DOWNLOAD_KEYS:
            config.pop(key)
    return config


def prepare_dataset(cfg: DataConfig, out_dir: Path, *, progress: bool = True) -> dict:
    """Reads ``cfg``'s source and writes ``data.pt`` + ``manifest.json`` into ``out_dir``.

    The caller passes a temporary directory (see ``wmdd.utils.atomic_dir``) so that a
    failure leaves no partial output. Returns the manifest.
    """
    info, reader = get_dataset(cfg.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = fetch_source(cfg, progress=progress)
    if cfg.name in LAZY_INDEXERS:
        return _prepare_lazy(cfg, resolved, out_dir, progress=progress)
    raw = reader(resolved, out_dir)
    _check_raw(raw, cfg.name)
    if info.mean is not None and info.std is not None:
        mean, std = info.mean, info.std
    else:
        mean, std = channel_stats(raw.train_x)
    data = PreparedData(
        name=cfg.name,
        classes=raw.classes,
        mean=tuple(mean),
        std=tuple(std),
        train_x=raw.train_x.contiguous(),
        train_y=raw.train_y,
        val_x=raw.val_x.contiguous(),
        val_y=raw.val_y,
    )
    if raw.skipped:
        log.warning("skipped %d unreadable images (data.skip_corrupt: true)", len(raw.skipped))
    return save_prepared(
        data,
        out_dir,
        {
            "description": info.description,
            "config": _manifest_config(cfg),
            **({"downloaded": resolved.source} if cfg.source == "download" else {}),
            "source_sha256": raw.source_sha256,
            "val_split_name": raw.val_split_name,
            "skipped": {"count": len(raw.skipped), "files": list(raw.skipped)},
        },
    )
