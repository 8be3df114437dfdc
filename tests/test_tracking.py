"""Tracking state that stays true, with real processes and a real SQLite store.

A worker script stands in for a stage: it opens a stage run (``wmdd.tracking.runs``), writes
into an atomic output directory and then sleeps, kills itself, or logs metrics, run through
``pipelines.common.run_main`` as every stage's command is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "tracking-test"

WORKER = textwrap.dedent(
    r"""
    import os, signal, subprocess, sys, time
    from pathlib import Path
    import torch
    from pipelines.common import run_main
    from wmdd.tracking.runs import stage_run
    from wmdd.utils import atomic_dir

    def main(argv):
        mode, cell = argv[0], argv[1]
        if mode == "parent":  # start a child stage, then wait to be killed
            child = subprocess.Popen([sys.executable, __file__, "sleep", cell])
            Path("child.pid").write_text(str(child.pid))
            time.sleep(600)
            return
        if mode == "metrics":  # start together: the first use of the store is the race
            time.sleep(max(0.0, float(argv[2]) - time.time()))
        tags = {"dataset": "d", "method": "m", "ipc": cell}
        with stage_run(experiment="tracking-test", stage="drill", run_name=f"drill/{cell}",
                       tags=tags, params={"p": 1}, inputs=[], device=torch.device("cpu")) as ml:
            if mode == "metrics":
                for i in range(200):
                    ml.log_metrics({"m": float(i), f"k{i % 7}": float(i)}, step=i)
                return
            with atomic_dir(Path("out") / cell) as tmp:
                (tmp / "partial").write_text("half written")
                print("STARTED", file=sys.stderr, flush=True)
                if mode == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)

    if __name__ == "__main__":
        run_main(main, sys.argv[1:])
    """
)


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "worker.py").write_text(WORKER)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _start(work: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(work / "worker.py"), *args],
        cwd=work,
        env=_env(**env),
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_started(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Reads the worker's stderr until it says STARTED."""
    seen, deadline = [], time.time() + timeout
    assert proc.stderr is not None
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if "STARTED" in line:
            return "".join(seen)
        if not line and proc.poll() is not None:
            break
    pytest.fail("worker did not start:\n" + "".join(seen))


def _runs(work: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([exp.experiment_id], max_results=1000)) if exp else []


def test_eight_stages_on_a_fresh_store_lose_nothing(work: Path) -> None:
    """First use of a store by 8 processes at once: every run and every metric lands."""
    assert not (work / "mlflow.db").exists()
    start_at = str(time.time() + 8)  # all begin together, after their imports
    procs = [_start(work, "metrics", f"c{i}", start_at) for i in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    runs = _runs(work)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "m")) == 200
        assert r.data.params == {"p": "1"}


def test_sigterm_ends_the_run_killed_and_leaves_no_partial_output(work: Path) -> None:
    proc = _start(work, "sleep", "1")
    _wait_started(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    (run,) = _runs(work)
    assert run.info.status == "KILLED"
    assert not (work / "out" / "1").exists() and not list((work / "out").glob(".*tmp*"))


def test_a_sigkilled_run_is_marked_failed_by_the_next_run_of_its_cell(work: Path) -> None:
    killed = _start(work, "sigkill", "7")
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (zombie,) = _runs(work)
    assert zombie.info.status == "RUNNING"  # nothing could end it
    other = _start(work, "sigkill", "8")  # another cell: leaves the zombie alone
    other.communicate(timeout=120)
    again = _start(work, "sleep", "7")
    _wait_started(again)
    again.terminate()
    again.communicate(timeout=60)
    runs = {r.info.run_id: r for r in _runs(work)}
    assert runs[zombie.info.run_id].info.status == "FAILED"
    assert "no longer exists" in runs[zombie.info.run_id].data.tags["note"]
    others = [r for r in runs.values() if r.data.tags["ipc"] == "8"]
    assert [r.info.status for r in others] == ["RUNNING"]


def test_a_stage_dies_with_its_parent(work: Path) -> None:
    """The parent (standing in for ``dvc``) is SIGKILLed: its stage child gets SIGTERM from
    the kernel, ends its run KILLED and removes its partial output."""
    parent = _start(work, "parent", "3")
    deadline = time.time() + 120
    while not (work / "child.pid").exists() or not _runs(work):
        assert time.time() < deadline, "the child stage did not start"
        time.sleep(0.2)
    child = int((work / "child.pid").read_text())
    parent.kill()
    parent.communicate(timeout=30)
    deadline = time.time() + 30
    while _alive(child):
        assert time.time() < deadline, f"stage process {child} outlived its parent"
        time.sleep(0.2)
    (run,) = _runs(work)
    assert run.info.status == "KILLED"
    assert not (work / "out" / "3").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def _health_server_after(port: int, delay: float) -> threading.Thread:
    """Starts answering ``GET /health`` with 200 on ``port`` after ``delay`` seconds."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    def serve() -> None:
        time.sleep(delay)
        with HTTPServer(("127.0.0.1", port), Health) as server:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_server_being_restarted_is_waited_for_within_the_timeout() -> None:
    from wmdd.tracking.store import TrackingError, check_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="not reachable"):
        check_server(f"http://127.0.0.1:{port}", timeout=1.5)  # nothing listens: fails fast
    assert time.perf_counter() - start < 5
    thread = _health_server_after(port, delay=2.0)  # comes up while the probe is retrying
    start = time.perf_counter()
    check_server(f"http://127.0.0.1:{port}", timeout=30)
    assert 1.5 < time.perf_counter() - start < 10
    thread.join(timeout=10)


def test_unreachable_server_fails_fast_in_one_line(work: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    proc = _start(work, "sleep", "1", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    _, err = proc.communicate(timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, err
    assert f"http://127.0.0.1:{port}" in err and "not reachable" in err
    assert "Traceback" not in err and "STARTED" not in err
    assert elapsed < 60, elapsed
