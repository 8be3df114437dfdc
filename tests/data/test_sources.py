"""``data.source: download`` (wmdd.data.sources): official archive table, download through the
prepare step from a local HTTP server on 127.0.0.1, and the errors for what cannot be fetched."""

from __future__ import annotations

import hashlib
import re
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from wmdd.config import DataConfig
from wmdd.data import load_prepared
from wmdd.data.download import DownloadError
from wmdd.data.prepare import prepare_dataset
from wmdd.data.sources import DEFAULT_ARCHIVE, KNOWN_ARCHIVES, fetch_source, resolve_download


class _Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """A served tiny ImageFolder archive ``ds.tar.gz`` (2 classes, train/ and val/)."""
    root = tmp_path / "www"
    tree = tmp_path / "tree" / "ds"
    for split, n in (("train", 3), ("val", 2)):
        for cls, colour in (("b", (0, 0, 250)), ("a", (250, 0, 0))):
            (tree / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), colour).save(tree / split / cls / f"{i}.png")
    root.mkdir()
    with tarfile.open(root / "ds.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="ds")
    server = _Server(root)
    try:
        yield server, root / "ds.tar.gz"
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_known_archives_are_well_formed() -> None:
    for name, archive in KNOWN_ARCHIVES.items():
        assert archive.filename == name and archive.size > 0
        assert archive.url.endswith("/" + name)
        assert archive.sha256 or archive.md5, name
        assert not archive.sha256 or re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
        assert not archive.md5 or re.fullmatch(r"[0-9a-f]{32}", archive.md5)
    for dataset, name in DEFAULT_ARCHIVE.items():
        assert KNOWN_ARCHIVES[name].dataset == dataset


def test_download_source_prepares_and_is_not_fetched_twice(served, tmp_path: Path) -> None:
    server, archive = served
    cfg = DataConfig(
        name="imagefolder",
        source="download",
        resolution=8,
        url=server.url("ds.tar.gz"),
        sha256=_sha(archive),
        download_dir=str(tmp_path / "downloads"),
    )
    out = tmp_path / "out"
    manifest = prepare_dataset(cfg, out, progress=False)
    data = load_prepared(out, verify=True)
    assert data.classes == ["a", "b"]
    assert len(data.train_y) == 6 and len(data.val_y) == 4
    assert int(data.train_x[data.train_y == 0][:, 0].min()) > 200  # class "a" is red
    assert manifest["source_sha256"] == _sha(archive)
    assert manifest["downloaded"] == str(tmp_path / "downloads" / "ds.tar.gz")
    assert manifest["config"]["url"] == cfg.url
    assert (tmp_path / "downloads" / "ds.tar.gz").read_bytes() == archive.read_bytes()
    assert server.requests == ["/ds.tar.gz"]

    prepare_dataset(cfg, tmp_path / "again", progress=False)
    assert server.requests == ["/ds.tar.gz"]  # verified local file reused, no request
    assert (tmp_path / "again" / "data.pt").read_bytes() == (out / "data.pt").read_bytes()


def test_checksum_mismatch_leaves_nothing(served, tmp_path: Path) -> None:
    """A mirror serving other bytes than the official imagenette2-160.tgz is rejected."""
    server, _ = served
    downloads = tmp_path / "downloads"
    cfg = DataConfig(
        name="imagenette",
        source="download",
        url=server.url("ds.tar.gz"),
        download_dir=str(downloads),
    )
    with pytest.raises(DownloadError, match="sha256: expected 64d0c485"):
        fetch_source(cfg, progress=False)
    assert not downloads.exists() or list(downloads.iterdir()) == []


def test_local_source_manifest_omits_download_keys(served, tmp_path: Path) -> None:
    _, archive = served
    manifest = prepare_dataset(
        DataConfig(name="imagefolder", source=str(archive), resolution=8),
        tmp_path / "out",
        progress=False,
    )
    assert "downloaded" not in manifest
    assert not {"archive", "url", "download_dir"} & set(manifest["config"])


def test_resolve_download_defaults_and_overrides() -> None:
    url, name, sha, md5, size = resolve_download(DataConfig(name="imagenette", source="download"))
    assert name == "imagenette2-160.tgz" and url == KNOWN_ARCHIVES[name].url
    assert sha == KNOWN_ARCHIVES[name].sha256 and size == KNOWN_ARCHIVES[name].size
    url, name, sha, md5, _ = resolve_download(
        DataConfig(name="imagenette", source="download", archive="imagenette2-320.tgz")
    )
    assert name == "imagenette2-320.tgz"
    _, name, sha, md5, size = resolve_download(DataConfig(name="tiny_imagenet", source="download"))
    assert sha == "" and md5 == KNOWN_ARCHIVES[name].md5 and size == 248100043


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(name="imagenette", archive="cifar-10-python.tar.gz"), "data.archive"),
        (DataConfig(name="imagenet1k", source="download"), "no public download"),
        (DataConfig(name="imagefolder", source="download", url="http://x/y.tgz"), "data.sha256"),
    ],
)
def test_resolve_download_errors(cfg: DataConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_download(cfg)
