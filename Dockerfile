# syntax=docker/dockerfile:1
# One image for every keyveil service; the command picks the service:
#   docker run keyveil:latest                                  -> token service
#   docker run keyveil:latest python -m services.proxy         -> proxy service
# Build:  docker build -t keyveil:latest .

ARG PYTHON_IMAGE=python:3.11-slim

# --- build stage: compilers live here only -----------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/keyveil
ENV PATH=/opt/keyveil/bin:$PATH
WORKDIR /src
# Dependencies first so a source-only change reuses the cached layer.
COPY pyproject.toml ./
RUN mkdir -p keyveil services shared \
 && touch keyveil/__init__.py services/__init__.py shared/__init__.py \
 && pip install . \
 && pip uninstall -y keyveil
COPY keyveil ./keyveil
COPY services ./services
COPY shared ./shared
RUN pip install --no-deps . \
 && python -m compileall -q /opt/keyveil

# --- runtime stage: interpreter, venv, nothing else ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="keyveil" \
      org.opencontainers.image.description="keyveil services (token, proxy, keymanager, auditor)"
# Read-only root filesystem: the only writable paths are /tmp (an emptyDir or tmpfs),
# so HOME and every cache point there and Python writes no bytecode, and the auditor's
# ledger checkpoint volume at /var/lib/keyveil/ledger and the proxy's event outbox
# at /var/lib/keyveil/outbox.
ENV PATH=/opt/keyveil/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    NODE_ENV=production
RUN groupadd --system --gid 10001 keyveil \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin keyveil \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/keyveil/ledger /var/lib/keyveil/outbox
COPY --from=build --chown=root:root /opt/keyveil /opt/keyveil
WORKDIR /opt/keyveil
USER 10001:10001
EXPOSE 8080 8081 8082 8083
VOLUME ["/tmp"]
STOPSIGNAL SIGTERM
# No shell, no curl in the image: the orchestrator probes /readyz over HTTP.
CMD ["python", "-m", "services.token"]
