"""Official download sources: ``data.source: download``.

A dataset with a public download names its archives here with their URL, size and
checksum. ``source: download`` fetches the chosen archive (``data.archive``; "" = the
dataset's default) into ``data.download_dir`` with :func:`wmdd.data.download.download`
(progress bar, resumable ``.part`` file, renamed into place only once size and checksum
match) and then prepares it exactly like a local copy of the same archive. A file that is
already there with the right checksum is not fetched again.

``data.url`` replaces the URL (a mirror); the checksum must still match. For a dataset
without an entry here (``imagefolder``), ``source: download`` needs ``data.url`` and
``data.sha256``. ImageNet-1K has no public download: give a local copy.

Checksums and sizes: Imagenette from TensorFlow Datasets' recorded checksums
(``imagenette/checksums.tsv``); CIFAR-10's SHA-256 and MD5 as checked by torchvision and
others; Tiny-ImageNet's publisher and every loader we know document only the MD5 and the
size, so that archive is verified by MD5 + size (its SHA-256 is recorded in the manifest
after the download).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from wmdd.config import DataConfig
from wmdd.data.download import download

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownArchive:
    """One official archive of a dataset."""

    dataset: str  # registry name of the dataset it holds
    filename: str
    url: str
    size: int  # bytes
    sha256: str = ""
    md5: str = ""


_FASTAI = "https://s3.amazonaws.com/fast-ai-imageclas"

KNOWN_ARCHIVES: dict[str, KnownArchive] = {
    a.filename: a
    for a in (
        KnownArchive(
            "imagenette",
            "imagenette2-160.tgz",
            f"{_FASTAI}/imagenette2-160.tgz",
            99003388,
            sha256="64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
        ),
        KnownArchive(
            "imagenette",
            "imagenette2-320.tgz",
            f"{_FASTAI}/imagenette2-320.tgz",
            341663724,
            sha256="569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
        ),
        KnownArchive(
            "imagenette",
            "imagenette2.tgz",
            f"{_FASTAI}/imagenette2.tgz",
            1557161267,
            sha256="6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
        ),
        KnownArchive(
            "tiny_imagenet",
            "tiny-imagenet-200.zip",
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            248100043,
            md5="90528d7ca1a48142e341f4ef8d21d0de",
        ),
        KnownArchive(
            "cifar10",
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            170498071,
            sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    )
}

DEFAULT_ARCHIVE = {
    "imagenette": "imagenette2-160.tgz",
    "tiny_imagenet": "tiny-imagenet-200.zip",
    "cifar10": "cifar-10-python.tar.gz",
}


def archives_of(dataset: str) -> list[str]:
    return sorted(name for name, a in KNOWN_ARCHIVES.items() if a.dataset == dataset)


def resolve_download(cfg: DataConfig) -> tuple[str, str, str, str, int | None]:
    """(url, file name, sha256, md5, size) that ``source: download`` fetches for ``cfg``.

    Raises:
        ValueError: naming the key, when nothing can be downloaded for this config.
    """
    if cfg.archive:
        if cfg.archive not in KNOWN_ARCHIVES or KNOWN_ARCHIVES[cfg.archive].dataset != cfg.name:
            raise ValueError(
                f"data.archive: {cfg.archive!r} is not an official archive of {cfg.name!r}; "
                f"known: {archives_of(cfg.name) or 'none'}"
            )
        known: KnownArchive | None = KNOWN_ARCHIVES[cfg.archive]
    else:
        default = DEFAULT_ARCHIVE.get(cfg.name)
        known = KNOWN_ARCHIVES[default] if default else None
    if known is None:
        if not (cfg.url and cfg.sha256):
            raise ValueError(
                f"data.source: download: {cfg.name!r} has no public download known to this "
                f"project (those with one: {', '.join(sorted(DEFAULT_ARCHIVE))}); give a local "
                "path (ImageNet-1K: your ILSVRC2012 copy; digits: builtin), or set data.url "
                "and data.sha256 to download from elsewhere"
            )
        filename = Path(urlparse(cfg.url).path).name or f"{cfg.name}.download"
        return cfg.url, filename, cfg.sha256.lower(), "", None
    url = cfg.url or known.url
    sha256 = (cfg.sha256 or known.sha256).lower()
    # A user-given SHA-256 for a known archive replaces its MD5 as well as its SHA-256.
    md5 = "" if cfg.sha256 else known.md5
    return url, known.filename, sha256, md5, known.size if not cfg.sha256 else None


def fetch_source(cfg: DataConfig, *, progress: bool = True) -> DataConfig:
    """For ``source: download``, downloads the archive and returns ``cfg`` pointing at it.

    Any other source is returned unchanged.
    """
    if cfg.source != "download":
        return cfg
    url, filename, sha256, md5, size = resolve_download(cfg)
    dest = Path(cfg.download_dir) / filename
    log.info("data.source: download: %s -> %s", url, dest)
    download(url, dest, sha256=sha256, md5=md5, size=size, progress=progress)
    return dataclasses.replace(cfg, source=str(dest), sha256=sha256)
