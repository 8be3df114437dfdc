"""Run a DVC pipeline's stages concurrently on a Dask cluster; DVC stays the record.

The graph is DVC's own (``Repo.index.graph``: a stage, and the stages whose outputs it
depends on), never a second copy of ``dvc.yaml``. The driver (this process) does exactly
what ``dvc repro`` does for each stage, in the same order of decisions, but submits the
stage's command to the cluster instead of running it in line:

1. once every upstream stage has finished, ask DVC whether the stage changed
   (``stage.changed()``); if not, it is skipped, as ``dvc repro`` skips it;
2. otherwise remove its outputs and try DVC's run cache (an identical earlier run is
   restored, not recomputed);
3. otherwise run its command on a worker, exactly as DVC would (``$SHELL -c cmd`` in the
   repository root with ``DVC_ROOT`` / ``DVC_STAGE`` set); a stage may first be split into
   sub-tasks (class ranges of a distillation, eval seeds of an evaluation) that run at
   once, after which its own command assembles their results;
4. when the command succeeds, save, commit and write the stage's ``dvc.lock`` entry
   (``stage.save()``, ``stage.commit()``, ``stage.dump()``), as ``dvc repro`` does.

A failing command is reported with the stage's name and the end of its log; nothing is
committed for it, its downstream stages do not run, every other stage goes on, and the
run exits non-zero. Finished stages stay committed, so running again continues where the
run stopped (and a killed stage resumes from its checkpoints). All DVC state is touched by
the driver alone, under DVC's repository lock; the workers only run commands, so they must
see the repository at the same path (a shared file system on a cluster).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_DIR = Path("logs") / "parallel"


class EngineMissingError(RuntimeError):
    """The distributed engine is not installed."""


def require_dask() -> Any:
    try:
        import distributed
    except ImportError:
        raise EngineMissingError(
            "the parallel runner needs Dask's distributed scheduler: pip install -e '.[cluster]'"
        ) from None
    return distributed


@dataclass(frozen=True)
class Task:
    """One command for a worker."""

    stage: str  # the DVC stage it belongs to (addressing, e.g. distill@digits-wmdd-10)
    label: str  # what it does, for logs ("distill@... classes 0:50")
    cmd: str  # shell command, run in the repository root
    gpu: bool = False  # needs one GPU (the worker's "GPU" resource)


def run_command(task: Task, root: str, log_file: str, threads_env: dict[str, str]) -> dict:
    """Runs ``task.cmd`` as DVC runs a stage command; its output goes to ``log_file``.

    Executed on a worker. Returns the exit status, the wall time and the log's tail.
    """
    env = {**os.environ, **threads_env, "DVC_ROOT": root, "DVC_STAGE": task.stage}
    if task.gpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = _worker_gpu()
    shell = os.environ.get("SHELL") or "/bin/sh"
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as out:
        out.write(f"> {task.cmd}\n")
        out.flush()
        proc = subprocess.run(
            [shell, "-c", task.cmd], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    lines = Path(log_file).read_text(errors="replace").splitlines()
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "tail": "\n".join(lines[-15:]),
        "host": os.uname().nodename,
    }


def _worker_gpu() -> str:
    """The GPU of this worker: its index among the workers of the machine (names end in an
    integer for local clusters), modulo the GPUs it sees."""
    import torch
    from distributed import get_worker

    count = max(1, torch.cuda.device_count())
    digits = "".join(ch for ch in str(get_worker().name) if ch.isdigit()) or "0"
    return str(int(digits) % count)


@dataclass
class Outcome:
    """What happened to each stage of a run."""

    ran: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # from DVC's run cache
    skipped: list[str] = field(default_factory=list)  # unchanged
    failed: dict[str, str] = field(default_factory=dict)  # stage -> error
    blocked: list[str] = field(default_factory=list)  # downstream of a failure
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


class PipelineRunner:
    """Schedules the stages of a DVC repository on a Dask client (see the module docstring).

    Args:
        root: The repository root (the workers' working directory).
        client: A ``distributed.Client``.
        split: ``split(stage) -> list of Task`` sub-tasks to run before the stage's own
            command (empty: run the command alone).
        gpu: Whether tasks claim one GPU each (workers must offer a ``GPU`` resource).
        threads_env: Environment for the commands (thread-count variables).
    """

    def __init__(
        self,
        root: Path,
        client: Any,
        *,
        split: Callable[[Any], list[Task]] | None = None,
        gpu: bool = False,
        threads_env: dict[str, str] | None = None,
        force: bool = False,
    ) -> None:
        from dvc.repo import Repo

        self.root = root.resolve()
        self.repo = Repo(str(self.root))
        self.client = client
        self.split = split or (lambda stage: [])
        self.gpu = gpu
        self.threads_env = threads_env or {}
        self.force = force

    # --- DVC state (driver only, under the repository lock) ---------------------------

    @contextlib.contextmanager
    def _dvc(self) -> Iterator[None]:
        with self.repo.lock:
            yield

    def plan(self, targets: list[str] | None = None) -> list[Any]:
        """The stages to consider, in the order ``dvc repro [targets]`` evaluates them
        (dependencies first; DVC's own ``plan_repro`` on DVC's own graph)."""
        from dvc.dvcfile import PROJECT_FILE
        from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

        stages = collect_stages(self.repo, targets or [PROJECT_FILE], recursive=False, glob=False)
        return plan_repro(get_active_graph(self.repo.index.graph), stages)

    def _append_in_plan_order(self, order: list[Any], before: set[str]) -> None:
        """``dvc repro`` appends the ``dvc.lock`` entries of stages new to it in the order it
        runs them; stages finish in another order here, so put new entries in plan order."""
        from dvc.utils.serialize import modify_yaml

        lock = self.root / "dvc.lock"
        if not lock.exists():
            return
        rank = {s.addressing: i for i, s in enumerate(order)}
        with self._dvc(), modify_yaml(lock) as data:
            stages = data.get("stages", {})
            old = [k for k in stages if k in before or k not in rank]
            new = sorted((k for k in stages if k not in before and k in rank), key=rank.__getitem__)
            items = [(k, stages[k]) for k in old + new]
            stages.clear()
            stages.update(items)

    def _prepare(self, stage: Any) -> str:
        """'skip', 'restored' or 'run', as ``dvc repro`` decides; for 'run' the outputs are
        removed and the deps saved, ready for the command."""
        from dvc.stage.cache import RunCacheNotFoundError

        with self._dvc():
            if not self.force and not stage.changed():
                return "skip"
            stage.remove_outs(ignore_remove=False, force=False)
            if not self.force:
                try:
                    self.repo.stage_cache.restore(stage)
                    self._record(stage)
                    return "restored"
                except RunCacheNotFoundError:
                    pass
            stage.save_deps()
        return "run"

    def _record(self, stage: Any) -> None:
        """Saves and commits the outputs and writes the ``dvc.lock`` entry."""
        no_cache = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
        stage.save(run_cache=not no_cache)
        stage.commit()
        stage.dump(update_pipeline=False)

    # --- scheduling ---------------------------------------------------------------------

    def _submit(self, task: Task) -> Any:
        log_file = self.root / LOG_DIR / f"{task.label.replace('/', '_').replace(' ', '_')}.log"
        resources = {"GPU": 1} if task.gpu else None
        return self.client.submit(
            run_command,
            task,
            str(self.root),
            str(log_file),
            self.threads_env,
            key=f"{task.label}-{time.monotonic_ns()}",
            resources=resources,
            pure=False,
        )

    def run(self, targets: list[str] | None = None) -> Outcome:
        from distributed import as_completed

        order = self.plan(targets)
        lock = self.root / "dvc.lock"
        before = set(_lock_stages(lock))
        graph = self.repo.index.graph
        upstream = {s: set(graph.successors(s)) & set(order) for s in order}
        outcome = Outcome()
        done: set[Any] = set()
        bad: set[Any] = set()
        waiting = list(order)
        pending = as_completed([])
        phase: dict[Any, str] = {}  # stage -> "parts" | "final"
        left: dict[Any, int] = {}  # stage -> sub-tasks still running
        futures: dict[Any, tuple[Any, Task]] = {}  # future -> (stage, task)
        started: dict[Any, float] = {}
        total = len(order)

        def launch(stage: Any) -> None:
            parts = self.split(stage)
            started[stage] = time.perf_counter()
            if parts:
                phase[stage], left[stage] = "parts", len(parts)
                for task in parts:
                    _add(stage, task)
            else:
                phase[stage] = "final"
                _add(stage, self._task(stage))

        def _add(stage: Any, task: Task) -> None:
            log.info("[%d/%d] %s: submitted", len(done) + len(bad) + 1, total, task.label)
            future = self._submit(task)
            futures[future] = (stage, task)
            pending.add(future)

        def schedule() -> None:
            """Starts, skips or restores every waiting stage whose upstream is done."""
            progress = True
            while progress:
                progress = False
                for stage in list(waiting):
                    if upstream[stage] & bad:
                        waiting.remove(stage)
                        bad.add(stage)
                        outcome.blocked.append(stage.addressing)
                        progress = True
                    elif upstream[stage] <= done:
                        waiting.remove(stage)
                        decision = self._prepare(stage)
                        if decision == "run":
                            launch(stage)
                            continue
                        done.add(stage)
                        kind = outcome.skipped if decision == "skip" else outcome.restored
                        kind.append(stage.addressing)
                        what = "unchanged" if decision == "skip" else "restored from the run cache"
                        log.info("%s: %s", stage.addressing, what)
                        progress = True

        schedule()
        for future in pending:
            stage, task = futures.pop(future)
            try:
                result = future.result()
            except Exception as err:  # the worker died or the task could not run
                result = {"returncode": -1, "tail": f"{type(err).__name__}: {err}", "seconds": 0}
            if stage in bad:
                continue
            if result["returncode"] != 0:
                bad.add(stage)
                outcome.failed[stage.addressing] = (
                    f"{task.label} exited {result['returncode']}:\n{result['tail']}"
                )
                log.error(
                    "%s FAILED (exit %s); its log ends:\n%s",
                    task.label,
                    result["returncode"],
                    result["tail"],
                )
            elif phase[stage] == "parts":
                left[stage] -= 1
                log.info("%s: done in %.1f s", task.label, result["seconds"])
                if left[stage] == 0:
                    phase[stage] = "final"
                    _add(stage, self._task(stage))
            else:
                with self._dvc():
                    self._record(stage)
                done.add(stage)
                outcome.ran.append(stage.addressing)
                outcome.seconds[stage.addressing] = time.perf_counter() - started[stage]
                log.info(
                    "[%d/%d] %s: done in %.1f s on %s",
                    len(done),
                    total,
                    stage.addressing,
                    result["seconds"],
                    result.get("host"),
                )
            schedule()
        for stage in waiting:  # only reachable when a failure blocked them
            outcome.blocked.append(stage.addressing)
        self._append_in_plan_order(order, before)
        return outcome

    def _task(self, stage: Any) -> Task:
        return Task(stage.addressing, stage.addressing, stage_command(stage), gpu=self.gpu)


def stage_command(stage: Any) -> str:
    """A DVC stage's command as one shell line (DVC runs a list of commands in turn)."""
    return stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)


def _lock_stages(lock: Path) -> list[str]:
    import yaml

    if not lock.exists():
        return []
    return list((yaml.safe_load(lock.read_text()) or {}).get("stages", {}))
