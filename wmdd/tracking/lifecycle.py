"""A stage process's life: who it is, whether it still lives, how it ends.

* :func:`process_tags` names the process on its MLflow run (``host``, ``pid`` and a
  ``process_token``: the process's start time in clock ticks since boot, from
  ``/proc/<pid>/stat``), so a later run can tell whether that process still exists even
  after the pid has been reused (:func:`process_alive`).
* :func:`install_signal_handlers` turns SIGTERM into :class:`StageInterrupted` (SIGINT is
  Python's ``KeyboardInterrupt``), so ``finally`` blocks run: the temporary output directory
  is removed and the MLflow run ends KILLED.
* :func:`die_with_parent` asks Linux to send SIGTERM to the stage when its parent (``dvc``,
  or the parallel runner's worker) dies, so a killed ``dvc repro`` leaves no stage process
  behind writing into the workspace outside DVC's control.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

HOST = socket.gethostname()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StageInterrupted(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: ``except Exception`` in
    library code must not swallow it)."""


def process_token(pid: int) -> str:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22), or "" off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; 22 - 3


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {"host": HOST, "pid": str(pid), "process_token": process_token(pid)}


def process_alive(pid: int, token: str = "") -> bool:
    """Whether ``pid`` runs on this host and, when ``token`` is given, is the same process
    (not a later one that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not token or process_token(pid) in ("", token)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise StageInterrupted(f"signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM -> :class:`StageInterrupted` in the main thread."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent exits (``prctl(PR_SET_PDEATHSIG)``).

    If the parent is already gone (re-parented to init) the process terminates at once.
    Elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        raise StageInterrupted("the parent process exited before the stage started")
