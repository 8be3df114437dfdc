# PostgreSQL for the team profile where no image can be pulled (docker/README.md): Debian
# bookworm's PostgreSQL 15 on the same local base as the other images, started the way the
# official postgres image starts (POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB on first
# start, then `postgres` with the compose file's arguments). Where images can be pulled the
# team profile uses postgres:15-bookworm instead; select this one with
#   docker build -f docker/postgres.Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE -t wmdd-postgres .
#   export POSTGRES_IMAGE=wmdd-postgres

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

# The official image's fixed UID/GID 999 (created before the package, which then uses it), so
# the data volume's owner is the same whichever image initialised it.
# Unpinned Debian packages: the base image's release pins them.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data

COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:${PATH} \
    PGDATA=/var/lib/postgresql/data
USER 999:999
VOLUME ["/var/lib/postgresql/data"]
ENTRYPOINT ["postgres-entrypoint.sh"]
CMD ["postgres", "-c", "listen_addresses=127.0.0.1"]
