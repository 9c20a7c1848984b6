# Baton: one image for every service. The entry point is the `baton` CLI
# (pyproject.toml [project.scripts]); the command picks the service:
#   docker run IMAGE executor
#   docker run IMAGE worker --name worker-1 --runtimes python,shell
# The base is pinned by digest (the multi-arch index of python:3.11-slim), so that a build is the
# same build tomorrow; refresh it on purpose with `docker buildx imagetools inspect python:3.11-slim`.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 baton \
 && useradd --system --uid 10001 --gid baton --no-create-home --home-dir /app --shell /usr/sbin/nologin baton

WORKDIR /app

# Dependencies exactly as locked, each checked against its hash (requirements.lock, made from
# pyproject.toml with `pip-compile --generate-hashes`); then the project itself, adding nothing.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY common/ common/
COPY executor/ executor/
COPY worker/ worker/
COPY dashboard/ dashboard/
COPY cli/ cli/
COPY examples/ examples/
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info

# Defaults; docker-compose.yaml mounts config/config.docker.yaml over its copy and points BATON_CONFIG at it.
COPY config/ config/
ENV BATON_CONFIG=/app/config/config.yaml

USER baton

# 9100: executor metrics, 9101: worker metrics (when metrics_port is set in the config), 8080: the dashboard.
EXPOSE 9100 9101 8080

ENTRYPOINT ["baton"]
CMD ["executor"]
