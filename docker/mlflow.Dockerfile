# A small MLflow tracking server: SQLite backend store and served artefacts in /mlflow (a volume);
# with docker-compose.team.yml, PostgreSQL and MLflow's basic-auth app (docker/README.md).
#
# Build from the repository root (for docker/certs/):
#   docker build -f docker/mlflow.Dockerfile -t wmdd-mlflow .
#   docker run --network host -v wmdd-mlflow:/mlflow wmdd-mlflow      # http://127.0.0.1:5000
# Clients log with MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (artefacts go through the server).

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The same range as pyproject.toml's mlflow requirement (tests/test_docker_files.py checks it).
ARG MLFLOW_REQUIREMENT="mlflow>=3.5,<4"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && if ! command -v python3.11 >/dev/null; then \
         apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
       fi \
    && rm -rf /var/lib/apt/lists/*

# Optional extra CA certificates (*.crt), e.g. a TLS-intercepting proxy's: see docker/certs/.
COPY docker/certs/ /usr/local/share/ca-certificates/wmdd-extra/
RUN update-ca-certificates

# The team server's drivers (pyproject.toml's `team` extra): PostgreSQL and the basic-auth app.
ARG TEAM_REQUIREMENTS="psycopg2-binary==2.9.13 flask-wtf>=1.2"
# hadolint ignore=SC2086
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install "${MLFLOW_REQUIREMENT}" ${TEAM_REQUIREMENTS}
ENV PATH=/opt/venv/bin:${PATH}

RUN useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlflow/artifacts \
    && chown -R mlflow:mlflow /mlflow
USER 1000:1000
WORKDIR /mlflow
VOLUME ["/mlflow"]

# Host headers the server accepts (DNS-rebinding protection): loopback on any port, and the
# compose service name for a bridge network. MLFLOW_SERVER_HOST=127.0.0.1 keeps a host-network
# server off the machine's other interfaces.
# MLFLOW_BACKEND_STORE_URI: SQLite in the volume by default; the team profile sets PostgreSQL.
# MLFLOW_APP_NAME=basic-auth turns on MLflow's authentication (MLFLOW_AUTH_CONFIG_PATH: its ini).
ENV MLFLOW_SERVER_HOST=0.0.0.0 \
    MLFLOW_SERVER_PORT=5000 \
    MLFLOW_BACKEND_STORE_URI=sqlite:////mlflow/mlflow.db \
    MLFLOW_APP_NAME="" \
    MLFLOW_ALLOWED_HOSTS="localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*"

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['MLFLOW_SERVER_PORT'] + '/health', timeout=4)"]

CMD ["sh", "-c", "exec mlflow server ${MLFLOW_APP_NAME:+--app-name \"$MLFLOW_APP_NAME\"} --backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\" --serve-artifacts --artifacts-destination /mlflow/artifacts --host \"$MLFLOW_SERVER_HOST\" --port \"$MLFLOW_SERVER_PORT\" --allowed-hosts \"$MLFLOW_ALLOWED_HOSTS\""]
