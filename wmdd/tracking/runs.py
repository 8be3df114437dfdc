"""MLflow tracking: one run per DVC stage execution, with the tags that join it to DVC.

The store is :func:`wmdd.tracking.store.tracking_uri` (``$MLFLOW_TRACKING_URI`` or
``./mlflow.db``). Every stage run gets:

* params: the stage's resolved configuration, flattened (``teacher.lr``, ...);
* tags: ``stage``, ``dataset`` (profile), ``method``, ``ipc``, ``git_commit`` (+ ``git_dirty``),
  ``protocol_hash`` where relevant, the versions of torch / torchvision / timm / POT /
  python, the device and torch's thread count, the host and process id;
* ``input.<path>.md5`` for each file the stage read and, once the stage succeeded,
  ``output.<path>.md5`` for each file it wrote. DVC's own hash of a file is its MD5, so
  runs join ``dvc.lock``, and the report finds the run behind an output by its content
  (outputs carry no run ids, timings or hosts: a re-run with the same inputs writes the
  same bytes, and DVC sees nothing changed);
* metrics and small artefacts logged by the stage itself.

Run state stays true: a stage that raises ends its run FAILED; SIGTERM or SIGINT (Ctrl-C,
``kill``, the parent ``dvc`` dying, see :func:`wmdd.tracking.lifecycle.die_with_parent`)
ends it KILLED; a run of the same stage and cell left RUNNING by a process that no longer
exists (``kill -9``, a lost node) is marked FAILED, with a note, when the cell runs again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from wmdd.tracking import lifecycle
from wmdd.tracking.store import RetryingMlflow, ensure_experiment, retrying, tracking_uri
from wmdd.utils import allocator, channels_last, file_digest

log = logging.getLogger(__name__)

_PARAM_BATCH = 100  # MLflow's per-call limit
_PARAM_MAX_LEN = 6000  # MLflow's value length limit


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The device a run computed on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{os.cpu_count()} cores ({cpu_model()})"


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


def output_tags(paths: list[Path]) -> dict[str, str]:
    """``output.<path>.md5`` for every file under ``paths``."""
    return {"output." + k.removeprefix("input."): v for k, v in input_tags(paths).items()}


def log_dataset(mlflow: Any, data_dir: Path, context: str) -> None:
    """The prepared dataset as the run's MLflow dataset input: named after the profile, its
    digest the SHA-256 of ``data.pt`` (or of a lazy ``index.pt``) from the manifest."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        return
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    manifest = json.loads(manifest_path.read_text())
    checksums = manifest.get("checksums", {})
    digest = next(iter(checksums.values()), "")[:16] if checksums else None
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": file:// is local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data_dir.resolve().as_uri())
    dataset = MetaDataset(source, name=data_dir.name, digest=digest)  # type: ignore[abstract]
    retrying(lambda: mlflow.log_input(dataset, context=context))


CELL_TAGS = ("dataset", "method", "ipc", "classes", "eval_seed")  # with ``stage``: a cell (part)


def log_curves(
    mlflow: Any, curves: dict[str, Any], *, steps: Any = None, max_points: int = 100
) -> None:
    """Logs per-iteration curves (name -> 1-D sequence, all of one length T) as MLflow
    metrics with ``step`` = iteration, at most ``max_points`` evenly spaced steps each (the
    last always), in one batch call; the MLflow UI draws them as charts."""
    from mlflow.entities import Metric

    if not curves:
        return
    length = len(next(iter(curves.values())))
    stride = max(1, -(-length // max_points))
    chosen = sorted(set(range(0, length, stride)) | {length - 1}) if length else []
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, float(values[t]), now, int(steps[t]) if steps is not None else t + 1)
        for name, values in curves.items()
        for t in chosen
    ]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        chunk = metrics[start : start + 1000]
        retrying(functools.partial(client.log_batch, run_id, metrics=chunk))


def mark_dead_runs(client: Any, experiment_id: str, stage: str, tags: dict[str, str]) -> list[str]:
    """Marks FAILED the runs of this stage and cell that are still RUNNING although their
    process, on this host, is gone; returns their ids. Runs of other hosts are left alone
    (their process cannot be checked from here) and reported in the log."""
    clauses = [f"tags.stage = '{stage}'", "attributes.status = 'RUNNING'"]
    clauses += [f"tags.{k} = '{tags[k]}'" for k in CELL_TAGS if k in tags]
    runs = retrying(
        lambda: client.search_runs([experiment_id], " and ".join(clauses), max_results=1000)
    )
    marked = []
    for run in runs:
        host, pid = run.data.tags.get("host"), run.data.tags.get("pid", "")
        token = run.data.tags.get("process_token", "")
        if host != lifecycle.HOST:
            log.warning(
                "run %s of this cell is RUNNING on host %s; left as it is", run.info.run_id, host
            )
            continue
        if pid.isdigit() and lifecycle.process_alive(int(pid), token):
            continue
        note = (
            f"marked FAILED by a later run of the same cell: its process (pid {pid} on {host}) "
            "no longer exists (killed with SIGKILL, or its machine went down)"
        )
        run_id = run.info.run_id
        retrying(functools.partial(client.set_tag, run_id, "note", note))
        retrying(functools.partial(client.set_terminated, run_id, "FAILED"))
        marked.append(run_id)
    if marked:
        log.warning("marked %d dead RUNNING run(s) of this cell FAILED: %s", len(marked), marked)
    return marked


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
    outputs: list[Path] | None = None,
) -> Iterator[Any]:
    """Starts an MLflow run for one stage execution and tags it; yields the ``mlflow``
    module (its logging calls retried while SQLite is busy).

    On success the files under ``outputs`` are tagged with their MD5 and the run ends
    FINISHED; on SIGTERM / SIGINT it ends KILLED, on any other exception FAILED, and the
    exception propagates.
    """
    import mlflow  # heavy import, only in stage processes

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    experiment_id = ensure_experiment(uri, experiment)
    mlflow.set_tracking_uri(uri)
    commit, dirty = git_state()
    str_tags = {k: str(v) for k, v in tags.items()}
    all_tags = {
        "stage": stage,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "device": device_description(device),
        "threads": str(torch.get_num_threads()),
        "memory_format": "channels_last" if channels_last() else "contiguous",
        "allocator": allocator(),
        **lifecycle.process_tags(),
        **{f"version.{k}": v for k, v in package_versions().items()},
        **input_tags(inputs),
        **str_tags,
    }
    mark_dead_runs(mlflow.MlflowClient(), experiment_id, stage, str_tags)
    run = retrying(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=run_name))
    tracked = RetryingMlflow(mlflow)
    try:
        tracked.set_tags(all_tags)
        _log_params(tracked, params)
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, uri)
        yield tracked
        if outputs:
            tracked.set_tags(output_tags(outputs))
    except (KeyboardInterrupt, lifecycle.StageInterrupted) as err:
        log.error("%s: interrupted (%s); MLflow run %s ends KILLED", run_name, err, run.info.run_id)
        retrying(lambda: mlflow.end_run(status="KILLED"))
        raise
    except BaseException:
        retrying(lambda: mlflow.end_run(status="FAILED"))
        raise
    retrying(lambda: mlflow.end_run(status="FINISHED"))
