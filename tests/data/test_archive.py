"""Tests for wmdd.data.archive.safe_extract."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from wmdd.data.archive import (
    CorruptArchiveError,
    UnsafeArchiveError,
    UnsupportedArchiveError,
    safe_extract,
)

GOOD_FILES = {
    "imagenette/train/n01440764/a.JPEG": b"\xff\xd8fake-jpeg-a" * 50,
    "imagenette/train/n02102040/b.JPEG": b"\xff\xd8fake-jpeg-b" * 70,
    "imagenette/val/n01440764/c.JPEG": b"\xff\xd8fake-jpeg-c" * 30,
    "imagenette/noisy_labels.csv": b"path,label\ntrain/a.JPEG,n01440764\n",
}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Empty parent directory for extraction destinations."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def _tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _tar_link(tf: tarfile.TarFile, name: str, target: str, *, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def _make_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            _tar_file(tf, name, data)
        for name, target in (links or {}).items():
            _tar_link(tf, name, target)
    return path


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def _make_zip(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            _zip_symlink(zf, name, target)
    return path


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _assert_nothing_extracted(work: Path, dest: Path) -> None:
    assert not dest.exists()
    assert list(work.iterdir()) == []  # no destination, no leftover .<name>.tmp-* dir


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_good_archive_extracts(tmp_path: Path, work: Path, suffix: str) -> None:
    archive = tmp_path / f"good{suffix}"
    if suffix == ".zip":
        _make_zip(archive, GOOD_FILES)
    else:
        _make_tar(archive, GOOD_FILES)
    dest = work / "raw"

    assert safe_extract(archive, dest) == dest
    assert _read_tree(dest) == GOOD_FILES
    assert sorted(p.name for p in work.iterdir()) == ["raw"]  # temp dir renamed away


def test_tar_symlink_inside_is_accepted(tmp_path: Path, work: Path) -> None:
    archive = _make_tar(
        tmp_path / "links.tar.gz",
        {"data/real.txt": b"hello"},
        {"data/alias.txt": "real.txt", "top.txt": "data/real.txt", "d2": "data"},
    )
    dest = work / "out"
    safe_extract(archive, dest)
    assert (dest / "data" / "alias.txt").is_symlink()
    assert (dest / "data" / "alias.txt").read_bytes() == b"hello"
    assert (dest / "top.txt").read_bytes() == b"hello"
    assert (dest / "d2" / "real.txt").read_bytes() == b"hello"


def test_tar_hardlink_inside_is_accepted(tmp_path: Path, work: Path) -> None:
    archive = tmp_path / "hard.tar"
    with tarfile.open(archive, "w") as tf:
        _tar_file(tf, "a/orig.bin", b"payload")
        _tar_link(tf, "b/copy.bin", "a/orig.bin", hard=True)
    dest = work / "out"
    safe_extract(archive, dest)
    assert (dest / "b" / "copy.bin").read_bytes() == b"payload"
    assert (dest / "b" / "copy.bin").stat().st_ino == (dest / "a" / "orig.bin").stat().st_ino


def test_zip_symlink_inside_is_accepted(tmp_path: Path, work: Path) -> None:
    archive = _make_zip(tmp_path / "links.zip", {"data/real.txt": b"hi"}, {"data/ln": "real.txt"})
    dest = work / "out"
    safe_extract(archive, dest)
    assert (dest / "data" / "ln").is_symlink()
    assert (dest / "data" / "ln").read_bytes() == b"hi"


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("../evil.txt", "'..'"),
        ("imagenette/../../evil.txt", "'..'"),
        ("ABSOLUTE", "absolute path"),
    ],
)
def test_path_escape_is_rejected(
    tmp_path: Path, work: Path, suffix: str, member: str, reason: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    if member == "ABSOLUTE":
        member = str(outside / "evil.txt")
    files = {"ok/first.txt": b"fine", member: b"pwned"}
    archive = tmp_path / f"bad{suffix}"
    if suffix == ".zip":
        _make_zip(archive, files)
    else:
        _make_tar(archive, files)
    dest = work / "out"

    with pytest.raises(UnsafeArchiveError) as excinfo:
        safe_extract(archive, dest)

    message = str(excinfo.value)
    assert repr(member) in message
    assert str(archive) in message
    assert reason in message
    _assert_nothing_extracted(work, dest)
    assert not (work / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
@pytest.mark.parametrize(
    ("links", "offender"),
    [
        ({"link": "/etc/passwd"}, "link"),
        ({"sub/link": "../../x"}, "sub/link"),
        ({"link": ".."}, "link"),
        # Each link alone stays inside; together d/e -> d/a/.. escapes via a -> ..
        ({"d/a": "..", "d/e": "a/.."}, "d/e"),
    ],
)
def test_symlink_outside_is_rejected(
    tmp_path: Path, work: Path, suffix: str, links: dict[str, str], offender: str
) -> None:
    files = {"d/keep.txt": b"x", "sub/keep.txt": b"y"}
    archive = tmp_path / f"links{suffix}"
    if suffix == ".zip":
        _make_zip(archive, files, links)
    else:
        _make_tar(archive, files, links)
    dest = work / "out"

    with pytest.raises(UnsafeArchiveError, match="symlink") as excinfo:
        safe_extract(archive, dest)

    assert repr(offender) in str(excinfo.value)
    _assert_nothing_extracted(work, dest)


@pytest.mark.parametrize("file_first", [False, True])
def test_write_through_escaping_symlink_is_rejected(
    tmp_path: Path, work: Path, file_first: bool
) -> None:
    archive = tmp_path / "through.tar"
    with tarfile.open(archive, "w") as tf:
        if file_first:
            _tar_file(tf, "esc/evil.txt", b"pwned")
        _tar_link(tf, "d/up", "..")  # resolves to dest itself: allowed on its own
        _tar_link(tf, "esc", "d/up/..")  # lexically "d", physically dest.parent
        if not file_first:
            _tar_file(tf, "esc/evil.txt", b"pwned")
    dest = work / "out"
    expected = "'esc/evil.txt' is written through a symlink" if file_first else "'esc' is a symlink"
    with pytest.raises(UnsafeArchiveError, match=expected):
        safe_extract(archive, dest)
    _assert_nothing_extracted(work, dest)
    assert not (work / "evil.txt").exists()


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd"])
def test_hardlink_outside_is_rejected(tmp_path: Path, work: Path, target: str) -> None:
    archive = tmp_path / "hard.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _tar_file(tf, "ok.txt", b"fine")
        _tar_link(tf, "dir/hl", target, hard=True)
    dest = work / "out"

    with pytest.raises(UnsafeArchiveError, match="hardlink") as excinfo:
        safe_extract(archive, dest)

    assert "'dir/hl'" in str(excinfo.value)
    assert repr(target) in str(excinfo.value)
    _assert_nothing_extracted(work, dest)


@pytest.mark.parametrize(
    ("tar_type", "what"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.FIFOTYPE, "FIFO")],
)
def test_device_and_fifo_members_are_rejected(
    tmp_path: Path, work: Path, tar_type: bytes, what: str
) -> None:
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tf:
        _tar_file(tf, "ok.txt", b"fine")
        info = tarfile.TarInfo("dev/thing")
        info.type = tar_type
        tf.addfile(info)
    dest = work / "out"
    with pytest.raises(UnsafeArchiveError, match=what) as excinfo:
        safe_extract(archive, dest)
    assert "'dev/thing'" in str(excinfo.value)
    _assert_nothing_extracted(work, dest)


def test_zip_fifo_is_rejected(tmp_path: Path, work: Path) -> None:
    archive = tmp_path / "fifo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("pipe")
        info.create_system = 3
        info.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(info, b"")
    dest = work / "out"
    with pytest.raises(UnsafeArchiveError, match="'pipe'.*FIFO"):
        safe_extract(archive, dest)
    _assert_nothing_extracted(work, dest)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar", ".zip"])
def test_truncated_archive_is_reported(tmp_path: Path, work: Path, suffix: str) -> None:
    archive = tmp_path / f"trunc{suffix}"
    big = {f"f{i}.bin": bytes([i]) * 20_000 + b"tail" for i in range(5)}
    if suffix == ".zip":
        _make_zip(archive, big)
    else:
        _make_tar(archive, big)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    dest = work / "out"

    with pytest.raises(CorruptArchiveError, match="corrupt or truncated") as excinfo:
        safe_extract(archive, dest)

    assert str(archive) in str(excinfo.value)
    _assert_nothing_extracted(work, dest)


def test_corrupt_member_data_cleans_up_staging(tmp_path: Path, work: Path) -> None:
    # The central directory is intact, so validation passes and the CRC error
    # only surfaces during extraction, after the staging directory exists.
    archive = tmp_path / "crc.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"first member")
        zf.writestr("b.txt", b"SECOND-MEMBER-CONTENT")
    data = bytearray(archive.read_bytes())
    pos = data.index(b"SECOND-MEMBER-CONTENT")
    data[pos] ^= 0x01
    archive.write_bytes(bytes(data))
    dest = work / "out"

    with pytest.raises(CorruptArchiveError, match="CRC") as excinfo:
        safe_extract(archive, dest)

    assert str(archive) in str(excinfo.value)
    _assert_nothing_extracted(work, dest)


def test_gzip_trailer_damage_is_reported(tmp_path: Path, work: Path) -> None:
    archive = _make_tar(tmp_path / "crc.tar.gz", {"a.txt": b"abc"})
    data = bytearray(archive.read_bytes())
    data[-8] ^= 0xFF  # gzip CRC32 of the uncompressed stream
    archive.write_bytes(bytes(data))
    dest = work / "out"
    with pytest.raises(CorruptArchiveError, match="crc.tar.gz"):
        safe_extract(archive, dest)
    _assert_nothing_extracted(work, dest)


def test_unsupported_suffix(tmp_path: Path, work: Path) -> None:
    archive = tmp_path / "data.rar"
    archive.write_bytes(b"Rar!")
    with pytest.raises(UnsupportedArchiveError, match=r"\.tar, \.tar\.gz, \.tgz, \.zip") as exc:
        safe_extract(archive, work / "out")
    assert "data.rar" in str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert list(work.iterdir()) == []


def test_existing_destination_is_refused(tmp_path: Path, work: Path) -> None:
    archive = _make_tar(tmp_path / "good.tar.gz", GOOD_FILES)
    dest = work / "out"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=str(dest)):
        safe_extract(archive, dest)
    assert _read_tree(dest) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_unsafe_error_is_value_error() -> None:
    assert issubclass(UnsafeArchiveError, ValueError)
    assert issubclass(CorruptArchiveError, ValueError)
