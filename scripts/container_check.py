"""Builds both images, starts the compose stack and runs the benchmark in it, then checks it.

What a new user does by hand (docker/README.md), timed, on a throwaway copy of this checkout:

1. copies the tracked files to a fresh git repository (``--workdir``; nothing of yours is
   touched), shrinks the grid unless ``--full`` (``--set KEY=VALUE`` as ``dvc exp run -S``),
   and hands it to the user the containers run as (yours; 1000 when you are root);
2. builds both images with ``docker-compose build`` (``BASE_IMAGE`` / ``TORCH_INDEX_URL``
   from the environment, as compose reads them);
3. starts the MLflow service detached on a free loopback port and waits for it to be healthy;
4. runs ``bench`` *detached* (``docker-compose run -d``) and follows it with ``docker wait``
   and ``docker logs``: no attached client that can time out (COMPOSE_HTTP_TIMEOUT) on a long
   run, and the benchmark's exit status is what comes back;
5. checks: the benchmark exited 0; ``reports/benchmark.md`` and ``dvc.lock`` are in the
   checkout and owned by the containers' user; ``/health`` answers ``OK``; every stage in
   ``dvc.lock`` has a FINISHED run in the server, read back over its REST API; neither
   container runs as root;
6. stops the stack and deletes its volume (``--keep`` leaves both).

``--restart-mlflow S`` restarts the MLflow service S seconds into the run: the benchmark must
still finish with every stage's run in the server (stages wait for the server for
``WMDD_TRACKING_TIMEOUT``, 120 s in compose, and MLflow's client retries its requests).

``--team`` runs the same over ``docker-compose.team.yml``: PostgreSQL as the backend store and
MLflow's basic-auth app, with fresh random passwords written to the copy's ``team.env`` and
``auth.ini`` (never to yours); the admin creates the ``bench`` account over the REST API, and
it checks in addition that a request without credentials or with a wrong password is refused
(401) and that the report stage, which reads every run back from the server, finished.
Where no image can be pulled, ``POSTGRES_IMAGE=wmdd-postgres`` builds Debian's PostgreSQL
from ``docker/postgres.Dockerfile`` on ``BASE_IMAGE``.

Prints one line per step with its time, the image sizes and a summary; ``--json`` writes them.
Exit status: 0 all checks passed, 1 a check failed, 2 no Docker engine or docker-compose
(the reason on one line; ``tests/test_containers.py`` skips on it).

    python scripts/container_check.py                      # smoke grid (about 10 min here)
    python scripts/container_check.py --full               # the default pipeline as committed
    BASE_IMAGE=wmdd-debian-bookworm:base python scripts/container_check.py --json out.json
    BASE_IMAGE=... POSTGRES_IMAGE=wmdd-postgres python scripts/container_check.py --team
"""

from __future__ import annotations

import argparse
import json
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = "docker/docker-compose.yml"
TEAM = "docker/docker-compose.team.yml"

# The pipeline's mechanics on the default (digits) profile in minutes: two methods, one
# set, shorter loops. --full runs params.yaml as committed (about 17 min of stages here).
SMOKE = [
    "benchmark.methods=[random,wmdd]",
    "benchmark.ipcs=[1]",
    "benchmark.eval_seeds=[0]",
    "benchmark.sets=1",
    "methods.random.sets=1",
    "datasets.digits.protocol.soft.epochs=50",
    "datasets.digits.protocol.soft.eval_interval=50",
    "datasets.digits.protocol.hard.epochs=50",
    "methods.wmdd.synthesis.iterations=50",
]


class Unavailable(Exception):
    """No Docker engine or no docker-compose: nothing can be checked here."""


def _sh(args: list[str], cwd: Path | None = None, env: dict | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc


def engine_reason() -> str | None:
    """Why containers cannot run here (None when they can)."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    if shutil.which("docker-compose") is None:
        return "docker-compose is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 20 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return "no Docker engine is running (`docker info` failed)"
    return None


def copy_checkout(dest: Path, overrides: list[str]) -> None:
    """The tracked and non-ignored files (no data, stores, reports or lock) as a new git repo."""
    listed = _sh(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT)
    for rel in listed.stdout.split():
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("reports/", "dvc.lock")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    certs = ROOT / "docker" / "certs"  # a proxy's CA bundle is git-ignored, but builds need it
    for crt in certs.glob("*.crt"):
        shutil.copy2(crt, dest / "docker" / "certs" / crt.name)
    if overrides:
        from dvc.utils.hydra import apply_overrides

        apply_overrides(dest / "params.yaml", overrides)
    git = ["git", "-c", "user.name=check", "-c", "user.email=check@localhost"]
    _sh(["git", "init", "-q"], dest)
    _sh(["git", "add", "-A"], dest)
    _sh([*git, "commit", "-qm", "container check"], dest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Auth = tuple[str, str] | None


def _request(url: str, body: dict | None, auth: Auth) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    return req


def http_json(url: str, body: dict | None = None, auth: Auth = None, timeout: float = 30) -> Any:
    with urllib.request.urlopen(_request(url, body, auth), timeout=timeout) as resp:
        return json.loads(resp.read().decode() or "{}")


def http_status(url: str, auth: Auth = None) -> int:
    try:
        with urllib.request.urlopen(_request(url, None, auth), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def server_runs(base: str, experiment: str, auth: Auth = None) -> list[dict]:
    """Every run of ``experiment`` on the server, through the REST API (paged)."""
    exp = http_json(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", auth=auth
    )
    runs: list[dict] = []
    token = None
    while True:
        body: dict[str, Any] = {"experiment_ids": [exp["experiment"]["experiment_id"]],
                                "max_results": 1000}  # fmt: skip
        if token:
            body["page_token"] = token
        page = http_json(f"{base}/api/2.0/mlflow/runs/search", body, auth)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def missing_stage_runs(lock: dict, runs: list[dict]) -> list[str]:
    """The ``dvc.lock`` stages with no FINISHED run carrying their stage and cell tags."""
    finished = []
    for run in runs:
        if run["info"]["status"] == "FINISHED":
            finished.append({t["key"]: t["value"] for t in run["data"].get("tags", [])})
    missing = []
    for name in lock["stages"]:
        stage, _, item = name.partition("@")
        want = {"stage": stage}
        parts = item.split("-") if item else []
        if parts:
            want["dataset"] = parts[0]
        if len(parts) == 3:
            want["method"], want["ipc"] = parts[1], parts[2]
        if not any(all(tags.get(k) == v for k, v in want.items()) for tags in finished):
            missing.append(name)
    return missing


def write_team_secrets(work: Path, mlflow_port: int, pg_port: int) -> dict[str, str]:
    """Fresh random passwords in the copy's ``docker/team.env`` and ``docker/auth.ini``."""
    pw = {k: secrets.token_urlsafe(18) for k in ("postgres", "admin", "bench")}
    db = f"postgresql+psycopg2://mlflow:{pw['postgres']}@127.0.0.1:{pg_port}/mlflow"
    (work / "docker" / "team.env").write_text(
        f"POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD={pw['postgres']}\nPOSTGRES_DB=mlflow\n"
        f"MLFLOW_BACKEND_STORE_URI={db}\n"
        f"MLFLOW_TRACKING_USERNAME=bench\nMLFLOW_TRACKING_PASSWORD={pw['bench']}\n"
    )
    (work / "docker" / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {db}\nadmin_username = admin\n"
        f"admin_password = {pw['admin']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return pw


class Check:
    """The steps, their times and the checks of one run."""

    def __init__(self, work: Path, uid: int, gid: int, project: str, port: int, team: bool) -> None:
        self.work, self.uid, self.gid, self.project, self.port = work, uid, gid, project, port
        self.files = ["-f", COMPOSE] + (["-f", TEAM] if team else [])
        self.times: dict[str, float] = {}
        self.checks: dict[str, bool] = {}
        self.details: dict[str, Any] = {}
        self.env = {
            **os.environ,
            "HOST_UID": str(uid),
            "HOST_GID": str(gid),
            "MLFLOW_PORT": str(port),
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            # Creating the bench container copies the whole 7 GB image on the vfs storage
            # driver: minutes, beyond docker-compose's default 60 s per request.
            "COMPOSE_HTTP_TIMEOUT": os.environ.get("COMPOSE_HTTP_TIMEOUT", "900"),
        }
        if team:
            self.env["POSTGRES_PORT"] = str(free_port())
            self.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)

    def compose(self, *args: str, check: bool = True, timeout: float | None = None):
        cmd = ["docker-compose", "-p", self.project, *self.files, *args]
        return _sh(cmd, self.work, self.env, check=check, timeout=timeout)

    def step(self, name: str, fn, *args, **kw):
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        out = fn(*args, **kw)
        self.times[name] = round(time.perf_counter() - start, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {self.times[name]:.1f} s", flush=True)
        return out

    def record(self, name: str, ok: bool, detail: Any = None) -> None:
        self.checks[name] = bool(ok)
        if detail is not None:
            self.details[name] = detail
        print(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.read().decode().strip() == "OK":
                        return
            except OSError:
                pass
            time.sleep(2)
        logs = self.compose("logs", "--tail", "40", "mlflow", check=False).stdout
        raise RuntimeError(f"the MLflow service was not healthy within {timeout:.0f} s:\n{logs}")

    def run_bench(self, command: list[str], restart_after: float = 0) -> int:
        """``run -d`` + ``docker wait``: the exit status survives a slow or dropped client.
        ``restart_after`` > 0: the MLflow service is restarted that many seconds in."""
        name = f"{self.project}_bench_check"
        self.compose("run", "-d", "--name", name, "bench", *command)
        self.details["bench_container"] = name
        if restart_after > 0:
            time.sleep(restart_after)
            state = _sh(["docker", "inspect", "--format", "{{.State.Running}}", name]).stdout
            start = time.perf_counter()
            self.compose("restart", "mlflow")
            self.wait_healthy()
            took = round(time.perf_counter() - start, 1)
            self.record("MLflow restarted while bench ran", state.strip() == "true",
                        f"{restart_after:g} s in, healthy again after {took} s")  # fmt: skip
        status = int(_sh(["docker", "wait", name]).stdout.strip())
        logs = _sh(["docker", "logs", name], check=False)
        (self.work / "bench.log").write_text(logs.stdout + logs.stderr)
        user = _sh(["docker", "inspect", "--format", "{{.Config.User}}", name]).stdout.strip()
        self.details["bench_user"] = user
        _sh(["docker", "rm", name], check=False)
        return status


def image_size(tag: str) -> int:
    out = _sh(["docker", "image", "inspect", "--format", "{{.Size}}", tag], check=False)
    return int(out.stdout.strip() or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where the copy goes (default: a new temp dir)")
    p.add_argument("--full", action="store_true", help="the default pipeline as committed")
    p.add_argument("--team", action="store_true", help="over docker-compose.team.yml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a params override (as dvc exp run -S); repeatable")  # fmt: skip
    p.add_argument("--restart-mlflow", type=float, default=0, metavar="SECONDS",
                   help="restart the MLflow service this long into the run")  # fmt: skip
    p.add_argument("--no-build", action="store_true", help="use the images already built")
    p.add_argument("--keep", action="store_true", help="leave the stack, volume and copy")
    p.add_argument("--json", type=Path, help="write times, sizes and checks here")
    args = p.parse_args(argv)

    reason = engine_reason()
    if reason:
        print(f"container check: cannot run: {reason}", file=sys.stderr)
        return 2
    uid, gid = (os.getuid(), os.getgid()) if os.getuid() != 0 else (1000, 1000)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wmdd-containers-"))
    work.mkdir(parents=True, exist_ok=True)
    project = f"wmddcheck{os.getpid()}"
    check = Check(work, uid, gid, project, free_port(), args.team)
    overrides = ([] if args.full else SMOKE) + args.set
    base = f"http://127.0.0.1:{check.port}"
    print(f"container check in {work} (user {uid}:{gid}, project {project}, port {check.port})")
    try:
        check.step("copy checkout", copy_checkout, work, overrides)
        auth: Auth = None
        if args.team:
            pw = write_team_secrets(work, check.port, int(check.env["POSTGRES_PORT"]))
            auth = ("admin", pw["admin"])
        if os.getuid() == 0:
            _sh(["chown", "-R", f"{uid}:{gid}", str(work)])
            # What the images' cached layers were built from keeps its owner: the legacy
            # builder's cache key for COPY includes the files' uid and gid.
            _sh(
                ["chown", "-R", "0:0", str(work / "pyproject.toml"), str(work / "docker" / "certs")]
            )
        if not args.no_build:
            if args.team and os.environ.get("POSTGRES_IMAGE") == "wmdd-postgres":
                check.step("build postgres image", _sh, [
                    "docker", "build", "--network", "host", "-f", "docker/postgres.Dockerfile",
                    "--build-arg", f"BASE_IMAGE={os.environ.get('BASE_IMAGE', 'debian:bookworm-slim')}",
                    "-t", "wmdd-postgres", "."], work, check.env)  # fmt: skip
            check.step("build mlflow image", check.compose, "build", "mlflow")
            check.step("build bench image", check.compose, "build", "bench")
        sizes = {t: image_size(t) for t in ("wmdd-bench", "wmdd-mlflow")}
        check.details["image_bytes"] = sizes
        print("  image sizes: " + ", ".join(f"{t} {b / 1e9:.2f} GB" for t, b in sizes.items()))
        check.step("mlflow up", check.compose, "up", "-d", "mlflow")
        check.step("mlflow healthy", check.wait_healthy)
        if args.team:
            assert auth is not None
            search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
            check.record("no credentials: 401", http_status(search) == 401, http_status(search))
            wrong = http_status(search, ("admin", "wrong"))
            check.record("wrong password: 401", wrong == 401, wrong)
            http_json(f"{base}/api/2.0/mlflow/users/create",
                      {"username": "bench", "password": pw["bench"]}, auth)  # fmt: skip
            mine = http_status(search, ("bench", pw["bench"]))
            check.record("the bench account is let in", mine == 200, mine)
        status = check.step("bench run (detached)", check.run_bench, [], args.restart_mlflow)
        check.record("bench exited 0", status == 0, f"exit {status}, log {work / 'bench.log'}")
        for rel in ("reports/benchmark.md", "dvc.lock"):
            path = work / rel
            owner = (path.stat().st_uid, path.stat().st_gid) if path.exists() else None
            check.record(f"{rel} written, owned by {uid}:{gid}", owner == (uid, gid), owner)
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            body = r.read().decode().strip()
        check.record("/health answers OK", body == "OK", body)
        import yaml

        lock_file = work / "dvc.lock"
        lock = yaml.safe_load(lock_file.read_text()) if lock_file.exists() else {"stages": {}}
        experiment = yaml.safe_load((work / "params.yaml").read_text())["benchmark"]["experiment"]
        runs = server_runs(base, experiment, auth)
        missing = missing_stage_runs(lock, runs)
        check.record(
            f"every dvc.lock stage ({len(lock['stages'])}) has a FINISHED run in the server",
            bool(lock["stages"]) and not missing,
            f"{len(runs)} runs; missing: {missing[:5]}" if missing else f"{len(runs)} runs",
        )
        mlflow_uid = check.compose("exec", "-T", "mlflow", "id", "-u").stdout.strip()
        check.record("mlflow container not root", mlflow_uid not in ("", "0"), f"uid {mlflow_uid}")
        bench_user = check.details.get("bench_user", "")
        check.record("bench container not root", bench_user.split(":")[0] not in ("", "0", "root"),
                     f"user {bench_user}")  # fmt: skip
        if args.team:
            pg_uid = check.compose("exec", "-T", "postgres", "id", "-u").stdout.strip()
            check.record("postgres container not root", pg_uid not in ("", "0"), f"uid {pg_uid}")
    except (RuntimeError, OSError) as err:
        check.record("no step failed", False, str(err).splitlines()[0])
        print(str(err), file=sys.stderr)
    finally:
        if not args.keep:
            check.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
    ok = bool(check.checks) and all(check.checks.values())
    summary = {"ok": ok, "team": args.team, "seconds": check.times, "checks": check.checks,
               "details": check.details, "workdir": str(work), "overrides": overrides}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(("all checks passed" if ok else "CHECKS FAILED") + f"; times {check.times}")
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
