"""MLflow tracking: one run per DVC stage execution, with the tags that join it to DVC.

The tracking store is ``$MLFLOW_TRACKING_URI`` when set (an MLflow server in containers),
else an SQLite file ``mlflow.db`` in the project root (git-ignored). Every stage run gets:

* params: the stage's resolved configuration, flattened (``teacher.lr``, ...);
* tags: ``stage``, ``dataset`` (profile), ``method``, ``ipc``, ``git_commit`` (+ ``git_dirty``),
  ``protocol_hash`` where relevant, ``input.<path>.md5`` for each DVC input file (DVC's own
  hash of a file is its MD5, so runs and ``dvc.lock`` entries can be joined), the versions
  of torch / torchvision / timm / POT / python, and the device;
* metrics and small artefacts (preview grids, the report) logged by the stage itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from wmdd.utils import file_digest

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
_PARAM_BATCH = 100  # MLflow's per-call limit
_PARAM_MAX_LEN = 6000  # MLflow's value length limit


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / DEFAULT_DB}"


def package_versions() -> dict[str, str]:
    """Versions of the packages that change results (recorded with every run)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "POT", "numpy", "wmdd-bench"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not-installed"
    return out


def git_state(root: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the repository at ``root``; ("unknown", False) outside git."""
    cwd = str(root or Path.cwd())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def input_tags(paths: list[Path]) -> dict[str, str]:
    """``input.<path>.md5`` for every file under ``paths`` (files or directories)."""
    tags = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            tags[f"input.{f.as_posix()}.md5"] = file_digest(f, "md5")
    return tags


def _log_params(mlflow, params: dict[str, Any]) -> None:
    items = [(k, str(v)[:_PARAM_MAX_LEN]) for k, v in params.items()]
    for i in range(0, len(items), _PARAM_BATCH):
        mlflow.log_params(dict(items[i : i + _PARAM_BATCH]))


@contextlib.contextmanager
def stage_run(
    *,
    experiment: str,
    stage: str,
    run_name: str,
    tags: dict[str, Any],
    params: dict[str, Any],
    inputs: list[Path],
    device: torch.device,
) -> Iterator[Any]:
    """Starts an MLflow run for one stage execution and tags it; yields the ``mlflow`` module.

    A failing stage marks its run FAILED (MLflow's context manager does this) and re-raises.
    """
    import mlflow  # heavy import, only in stage processes

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    commit, dirty = git_state()
    all_tags = {
        "stage": stage,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "device": device_description(device),
        **{f"version.{k}": v for k, v in package_versions().items()},
        **input_tags(inputs),
        **{k: str(v) for k, v in tags.items()},
    }
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(all_tags)
        _log_params(mlflow, params)
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, tracking_uri())
        yield mlflow
