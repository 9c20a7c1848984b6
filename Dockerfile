# Baton: one image for every service. The entry point is the `baton` CLI
# (pyproject.toml [project.scripts]); the command picks the service:
#   docker run IMAGE executor
#   docker run IMAGE worker --name worker-1 --runtimes python,shell
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 baton \
 && useradd --system --uid 10001 --gid baton --no-create-home --home-dir /app --shell /usr/sbin/nologin baton

WORKDIR /app

# Install the project (and its dependencies) from pyproject.toml; the sources stay in /app too.
COPY pyproject.toml README.md ./
COPY common/ common/
COPY executor/ executor/
COPY worker/ worker/
COPY examples/ examples/
RUN pip install . \
 && rm -rf build ./*.egg-info

# Defaults; docker-compose.yaml mounts config/config.docker.yaml over its copy and points BATON_CONFIG at it.
COPY config/ config/
ENV BATON_CONFIG=/app/config/config.yaml

USER baton

# 9100: executor metrics, 9101: worker metrics (when metrics_port is set in the config).
EXPOSE 9100 9101

ENTRYPOINT ["baton"]
CMD ["executor"]
