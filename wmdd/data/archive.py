"""Safe extraction of ``.tar``, ``.tar.gz``/``.tgz`` and ``.zip`` archives.

Every member is validated before anything is written: absolute paths, ``..``
components, links that resolve outside the destination (following the
archive's own symlinks, so chains of individually harmless links are caught)
and device files/FIFOs are refused with :class:`UnsafeArchiveError`. The
archive is then extracted into a temporary sibling directory that is renamed
to ``dest`` only when extraction succeeded, so ``dest`` is either complete or
absent.

Example:
    >>> from pathlib import Path
    >>> from wmdd.data.archive import safe_extract
    >>> root = safe_extract(
    ...     Path("downloads/imagenette2-160.tgz"), Path("data/raw/imagenette")
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ArchiveError",
    "CorruptArchiveError",
    "UnsafeArchiveError",
    "UnsupportedArchiveError",
    "safe_extract",
]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".zip")

_MAX_LINK_HOPS = 40  # like the kernel's ELOOP limit
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.ReadError,
    tarfile.CompressionError,
    tarfile.HeaderError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
)

_Kind = Literal["file", "dir", "symlink", "hardlink"]


class ArchiveError(ValueError):
    """Base class for archive problems raised by :func:`safe_extract`."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the destination or is of a forbidden type."""


class CorruptArchiveError(ArchiveError):
    """The archive is truncated or otherwise unreadable."""


class UnsupportedArchiveError(ArchiveError):
    """The archive's suffix is not one of :data:`SUPPORTED_SUFFIXES`."""


@dataclass(frozen=True)
class _Member:
    """Format-independent view of an archive member used for validation.

    Attributes:
        name: The member name exactly as stored in the archive.
        parts: ``name`` split into components, with empty and ``.`` parts dropped.
        kind: What extraction creates for the member.
        link: Symlink or hardlink target as stored, else ``None``.
    """

    name: str
    parts: tuple[str, ...]
    kind: _Kind
    link: str | None = None


def safe_extract(archive: Path, dest: Path) -> Path:
    """Validate every member of ``archive``, then extract it into ``dest``.

    The archive type is chosen by suffix (see :data:`SUPPORTED_SUFFIXES`).
    Extraction happens in ``dest.parent / ".<dest.name>.tmp-<random>"``, which
    is renamed to ``dest`` on success and removed on any failure.

    Args:
        archive: Path of the ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` file.
        dest: Directory to create; it must not exist yet.

    Returns:
        ``dest``.

    Raises:
        FileExistsError: ``dest`` already exists (nothing is touched).
        UnsupportedArchiveError: Unknown suffix.
        UnsafeArchiveError: A member is absolute, contains ``..``, is a link
            resolving outside ``dest``, or is a device file/FIFO.
        CorruptArchiveError: The archive is truncated or cannot be read.
    """
    archive = Path(archive)
    dest = Path(dest)
    kind = _archive_kind(archive)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"extraction destination {dest} already exists; remove it first")

    with _reading(archive):
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _validate(archive, [_zip_member(archive, info, zf) for info in infos])
                with _staging(dest) as tmp:
                    _extract_zip(zf, infos, tmp)
        else:
            mode: Literal["r:gz", "r:"] = "r:gz" if kind == "tar.gz" else "r:"
            with tarfile.open(archive, mode) as tf:
                tarinfos = tf.getmembers()  # walks the whole archive: detects truncation
                if kind == "tar.gz":
                    _drain(tf)
                _validate(archive, [_tar_member(archive, info) for info in tarinfos])
                with _staging(dest) as tmp:
                    _extract_tar(archive, tf, tarinfos, tmp)
    logger.info("extracted %s -> %s", archive, dest)
    return dest


def _archive_kind(archive: Path) -> Literal["tar", "tar.gz", "zip"]:
    """Map the archive's suffix to its format.

    Args:
        archive: Archive path.

    Returns:
        ``"tar"``, ``"tar.gz"`` or ``"zip"``.

    Raises:
        UnsupportedArchiveError: The suffix is not supported.
    """
    name = archive.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    raise UnsupportedArchiveError(
        f"cannot extract {archive}: unsupported archive type; supported suffixes are "
        + ", ".join(SUPPORTED_SUFFIXES)
    )


@contextmanager
def _reading(archive: Path) -> Iterator[None]:
    """Translate low-level read/decompression errors into :class:`CorruptArchiveError`.

    Args:
        archive: Archive path, named in the error message.

    Yields:
        Nothing; wraps the block that reads the archive.
    """
    try:
        yield
    except ArchiveError:
        raise
    except _CORRUPT_ERRORS as exc:
        raise CorruptArchiveError(
            f"{archive} is corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from exc


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """Provide a temporary sibling of ``dest`` and rename it to ``dest`` on success.

    Args:
        dest: Final directory.

    Yields:
        The temporary directory to extract into. It is removed if the block raises.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(f"extraction destination {dest} appeared during extraction")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _drain(tf: tarfile.TarFile) -> None:
    """Read a compressed tar stream to its end so the gzip CRC/length trailer is checked.

    ``getmembers`` stops at the tar end-of-archive block, so a ``.tar.gz`` cut
    off after it (or with a bad CRC) would otherwise go unnoticed.
    """
    stream = tf.fileobj
    if stream is None:
        return
    while stream.read(1 << 20):
        pass


def _split(name: str) -> tuple[str, ...]:
    """Split a stored path into POSIX components, dropping empty and ``.`` parts."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _has_dotdot(name: str) -> bool:
    """Return whether any component is ``..``, splitting on both ``/`` and ``\\``."""
    return ".." in re.split(r"[/\\]", name)


def _is_absolute(name: str) -> bool:
    """Return whether a stored path is absolute on POSIX or Windows."""
    return name.startswith(("/", "\\")) or bool(_DRIVE_RE.match(name))


def _tar_member(archive: Path, info: tarfile.TarInfo) -> _Member:
    """Convert a tar header to a :class:`_Member`, refusing forbidden types.

    Args:
        archive: Archive path (for messages).
        info: The tar member.

    Returns:
        The member description.

    Raises:
        UnsafeArchiveError: Device file, FIFO or other special member.
    """
    kind: _Kind
    if info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.isdir():
        kind = "dir"
    elif info.isreg():
        kind = "file"
    else:
        what = (
            "character device"
            if info.ischr()
            else "block device"
            if info.isblk()
            else "FIFO"
            if info.isfifo()
            else f"special member (type {info.type!r})"
        )
        raise _unsafe(archive, info.name, f"is a {what}; only files, directories and links")
    link = info.linkname if kind in ("symlink", "hardlink") else None
    return _Member(info.name, _split(info.name), kind, link)


def _zip_member(archive: Path, info: zipfile.ZipInfo, zf: zipfile.ZipFile) -> _Member:
    """Convert a zip entry to a :class:`_Member`, reading symlink targets.

    Args:
        archive: Archive path (for messages).
        info: The zip entry.
        zf: The open zip file (symlink targets are stored as member data).

    Returns:
        The member description.

    Raises:
        UnsafeArchiveError: Device file, FIFO or undecodable symlink target.
    """
    mode = info.external_attr >> 16  # Unix st_mode, 0 for most non-Unix zips
    parts = _split(info.filename)
    if stat.S_ISLNK(mode):
        raw = zf.read(info)
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _unsafe(
                archive, info.filename, "is a symlink whose target is not UTF-8"
            ) from None
        return _Member(info.filename, parts, "symlink", target)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise _unsafe(archive, info.filename, "is a device file, FIFO or socket")
    return _Member(info.filename, parts, "dir" if info.is_dir() else "file")


def _unsafe(archive: Path, member: str, reason: str) -> UnsafeArchiveError:
    """Build the error for an offending member."""
    return UnsafeArchiveError(f"refusing to extract {archive}: member {member!r} {reason}")


def _validate(archive: Path, members: list[_Member]) -> None:
    """Check all members before anything is extracted.

    Paths are resolved against a virtual copy of the destination that follows
    the archive's own symlinks, mirroring what the OS will do on extraction.

    Args:
        archive: Archive path (for messages).
        members: Every member of the archive.

    Raises:
        UnsafeArchiveError: For the first offending member.
    """
    symlinks: dict[tuple[str, ...], str] = {}
    seen: dict[tuple[str, ...], _Kind] = {}
    for m in members:
        if _is_absolute(m.name):
            raise _unsafe(archive, m.name, "has an absolute path")
        if _has_dotdot(m.name):
            raise _unsafe(archive, m.name, "has a '..' path component")
        if m.kind in ("symlink", "hardlink") and not m.parts:
            raise _unsafe(archive, m.name, f"is a {m.kind} replacing the extraction root")
        previous = seen.get(m.parts)
        if previous is not None and "symlink" in (previous, m.kind):
            raise _unsafe(archive, m.name, "is stored twice and one copy is a symlink")
        seen[m.parts] = m.kind
        if m.kind == "symlink":
            assert m.link is not None
            if not m.link or _is_absolute(m.link):
                raise _unsafe(archive, m.name, f"is a symlink to absolute path {m.link!r}")
            symlinks[m.parts] = m.link

    for m in members:
        if not m.parts:
            continue
        # The member's own location: its parent directory may run through symlinks.
        if _resolve(m.parts[:-1], symlinks) is None:
            raise _unsafe(archive, m.name, "is written through a symlink leading outside")
        if m.kind == "symlink":
            assert m.link is not None
            if _resolve(m.parts[:-1] + _split(m.link), symlinks) is None:
                raise _unsafe(
                    archive, m.name, f"is a symlink to {m.link!r}, which resolves outside"
                )
        elif m.kind == "hardlink":
            assert m.link is not None
            if _is_absolute(m.link) or _resolve(_split(m.link), symlinks) is None:
                raise _unsafe(
                    archive, m.name, f"is a hardlink to {m.link!r}, which resolves outside"
                )


def _resolve(
    parts: tuple[str, ...], symlinks: dict[tuple[str, ...], str]
) -> tuple[str, ...] | None:
    """Resolve a path relative to the extraction root, following archive symlinks.

    Args:
        parts: Path components relative to the root (may contain ``..``).
        symlinks: Symlink member path -> stored target, for every symlink in the archive.

    Returns:
        The physical path components inside the root, or ``None`` if the path
        leaves the root, hits an absolute link or loops.
    """
    pending = deque(parts)
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        resolved.append(part)
        target = symlinks.get(tuple(resolved))
        if target is None:
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS or _is_absolute(target):
            return None
        resolved.pop()  # a relative target is resolved from the link's directory
        pending.extendleft(reversed(_split(target)))
    return tuple(resolved)


def _extract_tar(
    archive: Path, tf: tarfile.TarFile, infos: list[tarfile.TarInfo], tmp: Path
) -> None:
    """Extract validated tar members, with the stdlib ``data`` filter as a second check.

    Args:
        archive: Archive path (for messages).
        tf: The open tar file.
        infos: Its members, already validated.
        tmp: Staging directory.

    Raises:
        UnsafeArchiveError: The ``data`` filter refused a member.
    """
    if not hasattr(tarfile, "data_filter"):
        # Python < 3.11.4: our own checks are the only guard. Mimic the data
        # filter's metadata handling: no special mode bits, no ownership changes.
        for info in infos:
            info.mode &= 0o777
            info.uid, info.gid = os.getuid(), os.getgid()
            info.uname = info.gname = ""
        tf.extractall(tmp, members=infos)
        return
    try:
        tf.extractall(tmp, members=infos, filter="data")
    except tarfile.FilterError as exc:
        member = getattr(exc, "tarinfo", None)
        name = member.name if member is not None else "?"
        raise _unsafe(archive, name, f"was refused by tarfile's data filter ({exc})") from exc


def _extract_zip(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], tmp: Path) -> None:
    """Extract validated zip entries, recreating Unix symlinks as symlinks.

    Args:
        zf: The open zip file.
        infos: Its entries, already validated.
        tmp: Staging directory.
    """
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            link_path = tmp.joinpath(*_split(info.filename))
            link_path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(zf.read(info).decode("utf-8"), link_path)
        else:
            zf.extract(info, tmp)
