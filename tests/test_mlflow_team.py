"""The team deployment, for real: an MLflow tracking server on PostgreSQL behind MLflow's
basic-auth app, with several stage processes logging at once (the parallel runner's case).

Slow-marked; needs PostgreSQL's server programs (``initdb``, ``pg_ctl``; Debian's
``postgresql`` package) and the ``team`` extra (``pip install -e '.[team]'``: psycopg2 and
MLflow's auth app). Skips, naming what is missing, elsewhere::

    pytest -m slow tests/test_mlflow_team.py
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tracking import WORKER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` (or ``nobody``) user."""
    if os.geteuid() != 0:
        return cmd
    user = "postgres" if _user_exists("postgres") else "nobody"
    return ["runuser", "-u", user, "--", *cmd]


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_http(url: str, proc: subprocess.Popen, *, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            out = log.read_text()[-3000:]
            raise AssertionError(f"server exited with {proc.returncode}: {out}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: postgresql)")
    pytest.importorskip("psycopg2", reason="the team extra is not installed (psycopg2)")
    # not under pytest's 0700 temporary root: the server's user must reach its directory
    root = Path(tempfile.mkdtemp(prefix="wmdd-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(root, user)
        shutil.chown(sock, user)
    port = _free_port()
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(
        _as_postgres_user([initdb, "-D", str(data), "-U", "mlflow", "-A", "trust"]), **run
    )  # type: ignore[call-overload]
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -k {sock}"
    subprocess.run(
        _as_postgres_user(
            [pg_ctl, "-D", str(data), "-o", opts, "-w", "start", "-l", str(root / "log")]
        ),
        **run,
    )  # type: ignore[call-overload]
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
            cur.execute("CREATE DATABASE mlflow_auth")
        conn.close()
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_postgres_user([pg_ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    pytest.importorskip("flask_wtf", reason="the team extra is not installed (mlflow[auth])")
    root = tmp_path_factory.mktemp("mlflow")
    password = secrets.token_urlsafe(16)
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {postgres}/mlflow_auth\n"
        f"admin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    log = (root / "server.log").open("w")
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"{postgres}/mlflow", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT,  # a file: a full pipe would block it
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, log=root / "server.log")
        yield {"url": url, "user": "admin", "password": password}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_an_unauthenticated_request_is_refused(server: dict[str, str]) -> None:
    search = f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(search) == 401
    assert _get(search, ("admin", "wrong")) == 401
    assert _get(search, (server["user"], server["password"])) == 200


def _workers(tmp: Path, server: dict[str, str], n: int, **extra: str) -> list[subprocess.Popen]:
    (tmp / "worker.py").write_text(WORKER)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": server["url"],
        **extra,
    }
    start_at = str(time.time() + 8)  # all begin together, after their imports
    return [
        subprocess.Popen(
            [sys.executable, str(tmp / "worker.py"), "metrics", f"c{i}", start_at],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]


def test_six_stages_log_at_once_with_credentials_and_lose_nothing(
    server: dict[str, str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    creds = {"MLFLOW_TRACKING_USERNAME": server["user"],
             "MLFLOW_TRACKING_PASSWORD": server["password"]}  # fmt: skip
    procs = _workers(tmp_path, server, 6, **creds)
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    os.environ.update(creds)
    try:
        client = MlflowClient(tracking_uri=server["url"])
        exp = client.get_experiment_by_name("tracking-test")
        assert exp is not None
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
        for r in runs:
            assert len(client.get_metric_history(r.info.run_id, "m")) == 200
    finally:
        for key in creds:
            os.environ.pop(key, None)


def test_a_stage_without_credentials_fails_in_one_line(
    server: dict[str, str], tmp_path: Path
) -> None:
    (proc,) = _workers(tmp_path, server, 1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    assert server["url"] in err and "HTTP 401" in err, err[-3000:]
    assert "MLFLOW_TRACKING_USERNAME" in err
    # a wrong password: the same one line, naming the user
    (proc,) = _workers(tmp_path, server, 1, MLFLOW_TRACKING_USERNAME="admin",
                       MLFLOW_TRACKING_PASSWORD="wrong")  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert "as user 'admin'" in err
