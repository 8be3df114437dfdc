"""The MLflow tracking store: where it is, created once and safely, reachable, retried.

* ``$MLFLOW_TRACKING_URI`` when set (an MLflow server), else ``sqlite:///<cwd>/mlflow.db``.
* A fresh SQLite store is created under an exclusive file lock (``mlflow.db.lock``), schema
  and experiment together, so stage processes started at once (class shards, ``dvc repro
  -s`` in two shells, the parallel runner) never race on the first use: without the lock
  two processes both try to create MLflow's tables and one dies with ``table ... already
  exists``.
* A server URI is probed (``GET /health``, asked again every second for up to
  ``WMDD_TRACKING_TIMEOUT`` seconds, default 5) before a stage does any work: an unreachable
  server is one line naming the URI, not minutes of MLflow's own retries and a traceback.
* Writes that SQLite legitimately refuses under concurrent writers (``database is
  locked``) are retried with backoff (:func:`retrying`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (one line: the URI and what to do)."""


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / DEFAULT_DB}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_server(uri: str, timeout: float | None = None) -> None:
    """Raises :class:`TrackingError` unless an ``http(s)`` tracking server answers
    ``/health`` within ``timeout`` seconds (``$WMDD_TRACKING_TIMEOUT``, default 5).

    A server that refuses connections is asked again every second until the time is up,
    so a server being restarted (``docker-compose restart mlflow``) is waited for when the
    timeout allows it; a server that answers with an error fails at once."""
    if not uri.startswith(("http://", "https://")):
        return
    timeout = timeout or float(os.environ.get("WMDD_TRACKING_TIMEOUT", "5"))
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(left, 0.5)) as response:  # noqa: S310
                if response.status == 200:
                    return
                problem = f"answered HTTP {response.status}"
            break
        except urllib.error.HTTPError as err:
            problem = f"answered HTTP {err.code}"
            break
        except (urllib.error.URLError, OSError) as err:
            problem = f"is not reachable ({getattr(err, 'reason', err)})"
        if deadline - time.monotonic() <= 1.0:
            break
        time.sleep(1.0)
    raise TrackingError(
        f"MLflow tracking server {uri} {problem} within {timeout:g} s: start it "
        "(`mlflow server --host 127.0.0.1 --port 5000 ...`, or `docker-compose up -d mlflow` in "
        "docker/) or unset MLFLOW_TRACKING_URI to log to ./mlflow.db"
    )


def _raise_if_refused_credentials(uri: str, err: Exception) -> None:
    """A server that refuses the request for want of (valid) credentials: one line naming
    the URI and the variables that carry them, before any work is done."""
    text = str(err)
    code = next((c for c in ("401", "403") if f"error code {c}" in text), None)
    if code is None:
        return
    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
    given = f"as user {who!r}" if who else "without credentials"
    raise TrackingError(
        f"MLflow tracking server {uri} refused the request {given} (HTTP {code}): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with write "
        "access (docker/README.md, 'A team server')"
    ) from None


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of ``experiment`` in the store at ``uri``, creating store and experiment once.

    For SQLite the schema creation and the experiment creation run under an exclusive
    file lock beside the database, so concurrent first users serialise; for a server the
    server serialises, and a lost creation race is resolved by reading the winner's id.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_server(uri)
    db = sqlite_path(uri)
    lock = _file_lock(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext()
    with lock:
        client = MlflowClient(tracking_uri=uri)
        try:
            found = retrying(lambda: client.get_experiment_by_name(experiment))
        except MlflowException as err:
            _raise_if_refused_credentials(uri, err)
            raise
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(experiment)
        except MlflowException:  # another process created it first (server stores)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id


def _refused(err: BaseException) -> bool:
    """Errors worth retrying: SQLite's lock contention."""
    text = str(err).lower()
    return "database is locked" in text or "database table is locked" in text


def retrying(fn: Callable[[], T], *, attempts: int = 8, first_delay: float = 0.2) -> T:
    """``fn()``, retried with exponential backoff while SQLite refuses for lock contention."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if not _refused(err) or attempt == attempts - 1:
                raise
            log.warning("tracking store busy (%s); retrying in %.1f s", err, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class RetryingMlflow:
    """The ``mlflow`` module with its logging calls retried by :func:`retrying`."""

    _RETRIED = frozenset(
        {"log_metric", "log_metrics", "log_param", "log_params", "set_tag", "set_tags"}
    )

    def __init__(self, mlflow: Any) -> None:
        self._mlflow = mlflow

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._mlflow, name)
        if name in self._RETRIED:
            return lambda *a, **kw: retrying(lambda: attr(*a, **kw))
        return attr
