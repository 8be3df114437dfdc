"""The containers, for real: both images built, the compose stack started, the benchmark run
in ``bench`` against the MLflow service (``scripts/container_check.py``).

The end-to-end test is slow-marked and needs a Docker engine and ``docker-compose``; it
skips, naming what is missing, elsewhere (CI)::

    pytest -m slow tests/test_containers.py -s      # about 10 min with the images built

On machines that cannot pull images, export ``BASE_IMAGE`` first (docker/README.md);
``WMDD_CONTAINER_NO_BUILD=1`` uses the images already built (on Docker's ``vfs`` storage driver
a rebuild copies the 7 GB image once per layer: tens of GB of disk). The MLflow service is
restarted 90 s into the run, which must still finish with every stage's run recorded. The
script's own checks (which stages lack a server run, why containers cannot run) are tested
here without Docker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "container_check", ROOT / "scripts" / "container_check.py"
)
assert _spec and _spec.loader
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def _run(status: str, **tags: str) -> dict:
    return {"info": {"status": status},
            "data": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}  # fmt: skip


def test_missing_stage_runs_matches_lock_entries_to_finished_runs_by_tags() -> None:
    lock = {"stages": {"prepare@digits": {}, "distill@digits-random-1": {},
                       "distill@digits-wmdd-10": {}, "report": {}}}  # fmt: skip
    runs = [
        _run("FINISHED", stage="prepare", dataset="digits"),
        _run("FINISHED", stage="distill", dataset="digits", method="random", ipc="1"),
        _run("FAILED", stage="distill", dataset="digits", method="wmdd", ipc="10"),
        _run("FINISHED", stage="distill", dataset="digits", method="wmdd", ipc="1"),
        _run("FINISHED", stage="report"),
    ]
    # the FAILED run and the run of another IPC do not count for distill@digits-wmdd-10
    assert check.missing_stage_runs(lock, runs) == ["distill@digits-wmdd-10"]
    runs.append(_run("FINISHED", stage="distill", dataset="digits", method="wmdd", ipc="10"))
    assert check.missing_stage_runs(lock, runs) == []


def test_no_engine_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no docker on PATH
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "container_check.py")],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "container check: cannot run: the docker client is not installed"


@pytest.mark.slow
def test_images_build_and_the_benchmark_runs_in_compose(tmp_path: Path) -> None:
    reason = check.engine_reason()
    if reason:
        pytest.skip(f"containers cannot run here: {reason}")
    out = tmp_path / "summary.json"
    extra = ["--no-build"] if os.environ.get("WMDD_CONTAINER_NO_BUILD") else []
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "container_check.py"),
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "checkout"),
            "--restart-mlflow",
            "90",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(proc.stdout[-6000:])
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert set(summary["checks"]) >= {
        "bench exited 0",
        "/health answers OK",
        "mlflow container not root",
        "bench container not root",
        "MLflow restarted while bench ran",
    }
    assert summary["details"]["image_bytes"]["wmdd-bench"] > 0
