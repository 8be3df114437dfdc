"""Resumable, checksum-verified HTTP downloads (standard library + tqdm only).

A file is fetched into ``<dest>.part`` and only renamed to ``dest`` once its
SHA-256 (and, if given, its size) match what the caller expects, so ``dest``
never holds a partial or unverified file. An interrupted transfer keeps the
``.part`` file and the next call resumes it with an HTTP ``Range`` request;
servers that ignore ``Range`` are handled by restarting from byte zero.

Example:
    >>> from pathlib import Path
    >>> from wmdd.data.download import download
    >>> path = download(
    ...     "https://example.org/imagenette2-160.tgz",
    ...     Path("downloads/imagenette2-160.tgz"),
    ...     sha256="<the published 64-hex-digit SHA-256 of the file>",
    ... )  # doctest: +SKIP

Re-running the same call is cheap: if ``dest`` already exists with the right
checksum no network request is made.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["DownloadError", "DownloadInterruptedError", "download", "file_digests", "sha256sum"]

logger = logging.getLogger(__name__)

_USER_AGENT = "wmdd-bench-downloader/0.1 (+urllib)"
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

# Errors that mean "the connection went away mid-transfer"; the .part file is kept.
_TRANSFER_ERRORS: tuple[type[BaseException], ...] = (
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
    ConnectionError,
    TimeoutError,
)


class DownloadError(RuntimeError):
    """A download failed or produced a file that does not match its checksum/size."""


class DownloadInterruptedError(DownloadError):
    """The transfer stopped early; the ``.part`` file is kept so a rerun resumes it."""


def sha256sum(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read per chunk.

    Returns:
        The lowercase hexadecimal digest.
    """
    return file_digests(path, chunk_size)["sha256"]


def file_digests(path: Path, chunk_size: int = 1 << 20) -> dict[str, str]:
    """SHA-256 and MD5 (hex) of a file in one pass over it."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_size):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _mismatches(digests: dict[str, str], expected: dict[str, str]) -> list[str]:
    return [
        f"{algo}: expected {want}, got {digests[algo]}"
        for algo, want in expected.items()
        if digests[algo] != want
    ]


def download(
    url: str,
    dest: Path,
    *,
    sha256: str = "",
    md5: str = "",
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous attempt and verifying SHA-256.

    Args:
        url: Source URL (``http``, ``https``; anything ``urllib`` opens).
        dest: Final path of the file. Its parent directory is created if needed.
        sha256: Expected hex SHA-256 of the complete file (case-insensitive).
        md5: Expected hex MD5, for sources whose publisher documents only an MD5
            (Tiny-ImageNet). At least one of ``sha256`` / ``md5`` is required; every one
            given is checked.
        size: Expected size in bytes, checked in addition to the checksum if given.
        progress: Show a tqdm progress bar.
        timeout: Socket timeout in seconds for connecting and for each read.
        chunk_size: Bytes read from the connection per iteration.

    Returns:
        ``dest``, which now holds the verified file.

    Raises:
        DownloadInterruptedError: The connection failed or dropped mid-transfer.
            The partial ``.part`` file is kept; calling again resumes it.
        DownloadError: The server answered with an error status, or the finished
            file's size/checksum does not match. On a mismatch the ``.part`` file
            is deleted and nothing is written to ``dest``.
    """
    dest = Path(dest)
    expected = {
        algo: value.strip().lower() for algo, value in (("sha256", sha256), ("md5", md5)) if value
    }
    if not expected:
        raise ValueError(f"download of {url}: an expected sha256 or md5 is required")
    for algo, value in expected.items():
        length = 64 if algo == "sha256" else 32
        if not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
            raise ValueError(f"{algo} must be {length} hex characters, got {value!r}")

    if dest.is_file():
        problems = _mismatches(file_digests(dest, chunk_size), expected)
        if not problems:
            logger.debug("%s already present with matching checksum; skipping download", dest)
            return dest
        logger.warning("%s exists but %s; downloading it again", dest, "; ".join(problems))

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and size is not None and part.stat().st_size > size:
        logger.warning("%s is larger than the expected %d bytes; restarting", part, size)
        part.unlink()

    fetch = functools.partial(
        _fetch, url, part, dest, progress=progress, timeout=timeout, chunk_size=chunk_size
    )
    if not fetch():
        # HTTP 416 on a resume: the part file is already as long as the resource.
        # Keep it if it verifies, otherwise throw it away and start over once.
        have = part.stat().st_size
        if (size is not None and have != size) or _mismatches(
            file_digests(part, chunk_size), expected
        ):
            logger.warning("%s does not verify after HTTP 416; restarting from zero", part)
            part.unlink()
            fetch()
    _verify_and_commit(url, part, dest, expected=expected, size=size, chunk_size=chunk_size)
    return dest


def _fetch(
    url: str,
    part: Path,
    dest: Path,
    *,
    progress: bool,
    timeout: float,
    chunk_size: int,
) -> bool:
    """Bring ``part`` up to the full remote content, resuming if possible.

    Args:
        url: Source URL.
        part: The ``.part`` file to create or extend.
        dest: Final destination (only used in messages and the progress label).
        progress: Show a progress bar.
        timeout: Socket timeout in seconds.
        chunk_size: Bytes per read.

    Returns:
        ``True`` if the body was transferred, ``False`` if the server answered
        HTTP 416 to a resume request (``part`` is then at least as long as the
        resource and must be verified by the caller).

    Raises:
        DownloadInterruptedError: The connection failed or dropped.
        DownloadError: The server answered with an unusable status.
    """
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, part, offset, timeout)
    if response is None:
        logger.info("server reports %s is already complete (HTTP 416)", part)
        return False

    with response:
        status = getattr(response, "status", None) or 200
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                if not offset:
                    raise DownloadError(
                        f"server sent a partial response (Content-Range start {start}) "
                        f"to a plain GET of {url}"
                    )
                logger.warning(
                    "server resumed %s at byte %s instead of %d; restarting from zero",
                    url,
                    start,
                    offset,
                )
                response.close()
                part.unlink(missing_ok=True)
                return _fetch(
                    url, part, dest, progress=progress, timeout=timeout, chunk_size=chunk_size
                )
            mode = "ab"
            logger.info("resuming %s at byte %d", url, offset)
        elif status in (200, 203):
            if offset:
                logger.info("server ignored the Range request for %s; restarting from zero", url)
            offset = 0
            mode = "wb"
        else:
            raise DownloadError(f"unexpected HTTP status {status} while downloading {url}")

        length_header = response.headers.get("Content-Length")
        remaining = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + remaining if remaining is not None else None
        received = 0
        try:
            with (
                part.open(mode) as fh,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while chunk := response.read(chunk_size):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except _TRANSFER_ERRORS as exc:
            raise _interrupted(url, part, exc) from exc
        except urllib.error.URLError as exc:
            raise _interrupted(url, part, exc.reason) from exc

        if remaining is not None and received < remaining:
            # http.client returns b"" instead of raising when the peer closes
            # early on sized reads, so a short body must be detected here.
            raise _interrupted(
                url, part, f"connection closed after {received} of {remaining} bytes"
            )
    return True


def _open(url: str, part: Path, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """Send the (possibly ranged) GET request.

    Args:
        url: Source URL.
        part: The ``.part`` file (for messages).
        offset: Bytes already present; a ``Range`` header is sent if non-zero.
        timeout: Socket timeout in seconds.

    Returns:
        The open response, or ``None`` if the server answered 416 to a resume.

    Raises:
        DownloadInterruptedError: The connection could not be made.
        DownloadError: The server answered with an HTTP error status.
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise DownloadError(
            f"HTTP {exc.code} {exc.reason} while downloading {url}"
            + (f" (partial file {part} kept)" if part.exists() else "")
        ) from exc
    except urllib.error.URLError as exc:
        raise _interrupted(url, part, exc.reason) from exc
    except _TRANSFER_ERRORS as exc:
        raise _interrupted(url, part, exc) from exc


def _content_range_start(header: str | None) -> int | None:
    """Return the first byte position of a ``Content-Range`` header, or ``None``."""
    if header is None:
        return None
    match = _CONTENT_RANGE_RE.match(header)
    return int(match.group(1)) if match else None


def _interrupted(url: str, part: Path, cause: object) -> DownloadInterruptedError:
    """Build the error raised when a transfer stops early (the part file is kept)."""
    have = part.stat().st_size if part.exists() else 0
    if have:
        kept = f"the partial file {part} ({have} bytes) is kept; rerun to resume the download"
    else:
        kept = "nothing was downloaded yet; rerun to retry"
    return DownloadInterruptedError(f"download of {url} interrupted ({cause}); {kept}")


def _verify_and_commit(
    url: str,
    part: Path,
    dest: Path,
    *,
    expected: dict[str, str],
    size: int | None,
    chunk_size: int,
) -> None:
    """Check the finished ``.part`` file and atomically move it to ``dest``.

    Args:
        url: Source URL (for messages).
        part: The downloaded ``.part`` file.
        dest: Final destination.
        expected: Expected lowercase hex digests by algorithm (``sha256``, ``md5``).
        size: Expected size in bytes, or ``None`` to skip the size check.
        chunk_size: Read size used for hashing.

    Raises:
        DownloadError: Size or checksum mismatch; ``part`` is deleted first.
    """
    actual_size = part.stat().st_size
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size: expected {size} bytes, got {actual_size} bytes")
    problems += _mismatches(file_digests(part, chunk_size), expected)
    if problems:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"download of {url} to {dest} failed verification ("
            + "; ".join(problems)
            + "). The partial file was deleted; if the source changed, update the "
            "expected checksum."
        )
    os.replace(part, dest)
    logger.info("downloaded %s -> %s (%d bytes, %s ok)", url, dest, actual_size, "+".join(expected))
