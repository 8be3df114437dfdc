"""Resumable long loops: checkpoints in a side directory that DVC never wipes.

A stage that trains or optimises for a long time (teacher and student training, image
synthesis) keeps its loop's state in ``.checkpoints/<stage>/<cell>/<key>/`` (git- and
DVC-ignored; DVC deletes a stage's outputs before running it, so checkpoints cannot live
there). ``key`` hashes everything the loop's result depends on: the stage's params, the
MD5 of its input files and the source of every project module loaded, so a checkpoint is
only ever resumed by the same computation. A loop saves its state at most every
``runtime.checkpoint_seconds`` (at an epoch or iteration boundary, atomically) and a later
run of the same stage resumes from it, saying where; the stage deletes the directory once
its outputs are written. Every loop saves *all* of its state (weights, optimiser and
scheduler state, the state of its random generators, its history), so a resumed run ends
with the same bytes as an uninterrupted one (``tests/test_resume.py`` kills real processes
with SIGKILL to check this).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wmdd.utils import atomic_file, file_digest

log = logging.getLogger(__name__)

ROOT = Path(".checkpoints")


def code_digest() -> str:
    """SHA-256 over the source of every loaded project module (``wmdd``, ``baselines``,
    ``pipelines``): a checkpoint written by other code is never resumed."""
    h = hashlib.sha256()
    for name in sorted(sys.modules):
        if name.split(".")[0] not in {"wmdd", "baselines", "pipelines"}:
            continue
        path = getattr(sys.modules[name], "__file__", None)
        if path and Path(path).is_file():
            h.update(name.encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def input_digest(paths: list[Path]) -> dict[str, str]:
    """MD5 of every file under ``paths`` (files or folders), by relative path."""
    out = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out.update({f.as_posix(): file_digest(f, "md5") for f in files})
    return out


class Checkpointer:
    """The checkpoint of one loop: ``load`` once at the start, ``step`` at every boundary.

    Args:
        path: The checkpoint file, or ``None`` to disable checkpointing.
        every_seconds: Save at the first boundary at least this long after the last save
            (0: at every boundary).
        what: Names the loop in log lines ("teacher", "student seed 1", ...).
    """

    def __init__(self, path: Path | None, *, every_seconds: float = 300.0, what: str = "loop"):
        self.path, self.every, self.what = path, every_seconds, what
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (no checkpoint, or checkpointing disabled)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: start over, loudly
            log.warning("%s: ignoring unreadable checkpoint %s (%s)", self.what, self.path, err)
            return None
        log.warning("%s: resuming from %s (%s)", self.what, self.path, state.get("where", "?"))
        return state

    def step(self, state: Callable[[], dict[str, Any]], *, force: bool = False) -> bool:
        """Saves ``state()`` if the interval has passed (or ``force``); returns whether."""
        if self.path is None:
            return False
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            torch.save(state(), tmp)
        self._last = now
        return True

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class StageCheckpoints:
    """The checkpoint directory of one stage execution (None: checkpointing disabled).

    ``loop(name)`` is the :class:`Checkpointer` of one loop; ``result(name)`` /
    ``save_result(name, value)`` keep the results of loops already finished within the
    stage (an eval seed, a synthesis batch); ``clear()`` removes everything once the stage's
    outputs are written.
    """

    def __init__(self, directory: Path | None, *, every_seconds: float = 300.0) -> None:
        self.directory, self.every = directory, every_seconds

    @classmethod
    def for_stage(
        cls,
        stage: str,
        cell: list[str],
        *,
        params: Any,
        inputs: list[Path],
        every_seconds: float,
    ) -> StageCheckpoints:
        """The directory keyed by the stage's params, input files and code
        (``every_seconds < 0`` disables the loops' checkpoints; finished parts of a stage,
        such as the class shards or eval seeds the parallel runner computes as separate
        tasks, are always kept there)."""
        blob = repr((params, sorted(input_digest(inputs).items()), code_digest())).encode()
        key = hashlib.sha256(blob).hexdigest()[:16]
        return cls(ROOT / stage / "/".join(cell) / key, every_seconds=every_seconds)

    def loop(self, name: str, what: str) -> Checkpointer:
        path = None
        if self.directory is not None and self.every >= 0:
            path = self.directory / f"{name}.pt"
        return Checkpointer(path, every_seconds=self.every, what=what)

    def result(self, name: str) -> Any | None:
        if self.directory is None or not (self.directory / f"{name}.done.pt").is_file():
            return None
        log.warning("reusing the finished %s from %s", name, self.directory)
        return torch.load(self.directory / f"{name}.done.pt", map_location="cpu", weights_only=True)

    def results(self, prefix: str) -> dict[str, Any]:
        """Every finished result whose name starts with ``prefix``, by name."""
        if self.directory is None or not self.directory.is_dir():
            return {}
        names = sorted(
            p.name[: -len(".done.pt")] for p in self.directory.glob(f"{prefix}*.done.pt")
        )
        return {n: self.result(n) for n in names}

    def save_result(self, name: str, value: Any) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.directory / f"{name}.done.pt") as tmp:
            torch.save(value, tmp)
        (self.directory / f"{name}.pt").unlink(missing_ok=True)

    def clear(self) -> None:
        if self.directory is not None and self.directory.exists():
            shutil.rmtree(self.directory)
            for parent in self.directory.parents:  # prune empty cell folders
                if parent == ROOT.parent or any(parent.iterdir()):
                    break
                parent.rmdir()


def loop_state(
    where: str,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    generator: torch.Generator | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a training loop needs to continue exactly: module, optimiser, scheduler
    and generator states plus ``extra`` (epoch, history...); ``where`` is logged on resume."""
    state: dict[str, Any] = {"where": where, **extra}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_loop(
    state: dict[str, Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    generator: torch.Generator | None = None,
) -> None:
    """Loads what :func:`loop_state` saved into the given objects (strictly)."""
    if model is not None:
        model.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if generator is not None:
        generator.set_state(state["generator"])
