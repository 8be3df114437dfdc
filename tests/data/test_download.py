"""Tests for wmdd.data.download against a local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wmdd.data.download import DownloadError, DownloadInterruptedError, download, sha256sum

CHUNK = 16 * 1024


@dataclass
class ServerState:
    """What the test server serves and what it saw.

    Attributes:
        payload: Bytes served for every GET.
        honour_range: If False the server ignores ``Range`` and always answers 200.
        drop_after: If set, the next response is cut off after this many body
            bytes (one-shot), simulating a dropped connection.
        requests: ``Range`` header (or None) of every GET received, in order.
        lock: Guards ``requests`` and ``drop_after`` across handler threads.
    """

    payload: bytes
    honour_range: bool = True
    drop_after: int | None = None
    requests: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append(rng)
                drop_after, state.drop_after = state.drop_after, None
            data = state.payload
            start = 0
            if rng is not None and state.honour_range:
                match = re.fullmatch(r"bytes=(\d+)-", rng)
                assert match, f"unexpected Range header {rng!r}"
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if state.honour_range else "none")
            self.end_headers()
            if drop_after is not None:
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@dataclass
class Server:
    url: str
    state: ServerState


def _payload(tmp_path: Path) -> bytes:
    """A small .tar.gz with a few hundred KB of incompressible random bytes."""
    rng = random.Random(1234)
    blob = rng.randbytes(300 * 1024)
    src = tmp_path / "payload.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        info = tarfile.TarInfo("images/blob.bin")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    return src.read_bytes()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    state = ServerState(payload=_payload(tmp_path))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(url=f"http://{host}:{port}/imagenette.tar.gz", state=state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _get(server: Server, dest: Path, **kwargs: object) -> Path:
    payload = server.state.payload
    kwargs.setdefault("sha256", _sha(payload))
    kwargs.setdefault("size", len(payload))
    return download(server.url, dest, progress=False, timeout=5, chunk_size=CHUNK, **kwargs)


def test_sha256sum_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert sha256sum(path, chunk_size=1000) == _sha(data)


def test_download_with_correct_checksum(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "archive.tar.gz"
    result = _get(server, dest)
    assert result == dest
    assert dest.read_bytes() == server.state.payload
    assert len(server.state.payload) > 300 * 1024  # really a multi-chunk transfer
    assert not dest.with_name("archive.tar.gz.part").exists()
    assert server.state.requests == [None]
    with tarfile.open(dest) as tf:
        assert tf.getnames() == ["images/blob.bin"]


def test_corrupted_byte_is_rejected(server: Server, tmp_path: Path) -> None:
    good = server.state.payload
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    server.state.payload = bytes(bad)
    dest = tmp_path / "archive.tar.gz"

    with pytest.raises(DownloadError) as excinfo:
        _get(server, dest, sha256=_sha(good), size=len(good))

    message = str(excinfo.value)
    assert not isinstance(excinfo.value, DownloadInterruptedError)
    assert server.url in message
    assert str(dest) in message
    assert _sha(good) in message
    assert _sha(bytes(bad)) in message
    assert not dest.exists()
    assert not dest.with_name("archive.tar.gz.part").exists()
    assert list(tmp_path.glob("archive*")) == []


def test_size_mismatch_is_rejected(server: Server, tmp_path: Path) -> None:
    payload = server.state.payload
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(
        DownloadError, match=rf"expected {len(payload) + 1} bytes, got {len(payload)}"
    ):
        _get(server, dest, size=len(payload) + 1)
    assert not dest.exists()
    assert not dest.with_name("archive.tar.gz.part").exists()


def test_interrupted_download_resumes(server: Server, tmp_path: Path) -> None:
    payload = server.state.payload
    dest = tmp_path / "archive.tar.gz"
    part = dest.with_name("archive.tar.gz.part")
    cut = 100_000
    server.state.drop_after = cut

    with pytest.raises(DownloadInterruptedError, match="rerun to resume") as excinfo:
        _get(server, dest)
    assert str(part) in str(excinfo.value)
    assert not dest.exists()
    assert part.read_bytes() == payload[:cut]

    assert _get(server, dest) == dest
    assert server.state.requests == [None, f"bytes={cut}-"]
    assert dest.read_bytes() == payload
    assert not part.exists()


def test_server_without_range_support_restarts(server: Server, tmp_path: Path) -> None:
    payload = server.state.payload
    server.state.honour_range = False
    dest = tmp_path / "archive.tar.gz"
    part = dest.with_name("archive.tar.gz.part")
    # Garbage in the part file: appending to it instead of restarting would fail the checksum.
    part.write_bytes(b"\x00" * 50_000)

    assert _get(server, dest) == dest
    assert server.state.requests == ["bytes=50000-"]
    assert dest.read_bytes() == payload
    assert not part.exists()


def test_complete_part_file_and_416_is_verified(server: Server, tmp_path: Path) -> None:
    payload = server.state.payload
    dest = tmp_path / "archive.tar.gz"
    part = dest.with_name("archive.tar.gz.part")
    part.write_bytes(payload)

    assert _get(server, dest) == dest
    assert server.state.requests == [f"bytes={len(payload)}-"]
    assert dest.read_bytes() == payload
    assert not part.exists()


def test_bad_full_length_part_file_and_416_restarts(server: Server, tmp_path: Path) -> None:
    payload = server.state.payload
    dest = tmp_path / "archive.tar.gz"
    part = dest.with_name("archive.tar.gz.part")
    part.write_bytes(b"\x01" * len(payload))

    assert _get(server, dest) == dest
    assert server.state.requests == [f"bytes={len(payload)}-", None]
    assert dest.read_bytes() == payload


def test_existing_dest_with_matching_checksum_makes_no_request(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(server.state.payload)
    before = dest.stat().st_mtime_ns

    assert _get(server, dest) == dest
    assert server.state.requests == []
    assert dest.stat().st_mtime_ns == before


def test_existing_dest_with_wrong_checksum_is_replaced(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(b"stale")

    assert _get(server, dest) == dest
    assert server.state.requests == [None]
    assert dest.read_bytes() == server.state.payload


def test_unreachable_server_raises_interrupted(tmp_path: Path) -> None:
    # Bind and close a socket to obtain a port nobody listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "x.bin"
    with pytest.raises(DownloadInterruptedError, match=r"http://127\.0\.0\.1:\d+/x\.bin"):
        download(f"http://127.0.0.1:{port}/x.bin", dest, sha256="0" * 64, progress=False, timeout=2)
    assert not dest.exists()
