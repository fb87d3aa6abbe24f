# qserve CPU image: the OpenAI-compatible server with the embedded torch engine.
#
# Built offline from a wheelhouse, so a build fetches nothing (see deploy/README.md):
#   deploy/wheelhouse.sh                       # writes .whl/ (our wheel + pinned deps, CPU torch)
#   docker build -t qserve .
#   docker run --init -p 127.0.0.1:8000:8000 --memory 4g \
#     -v "$PWD/mymodel:/models/model:ro" qserve
# Build options: --build-arg BASE_IMAGE=... (any Debian-like image with python3.11 + venv),
# --build-context wheels=DIR (a wheelhouse elsewhere), --build-context model=DIR (bake a model in).
# Configuration is by environment: QSERVE_MODEL, QSERVE_PORT, QSERVE_MEMORY_BUDGET,
# QSERVE_API_KEY, QSERVE_ADMIN_TOKEN, QSERVE_SERVED_MODEL_NAME, QSERVE_MAX_MODEL_LEN.
ARG BASE_IMAGE=python:3.11-slim

# Named stages that `--build-context NAME=DIR` replaces.
FROM scratch AS wheels
COPY .whl/ /

FROM scratch AS model
COPY deploy/model-placeholder/ /

FROM ${BASE_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="qserve" \
      org.opencontainers.image.description="LLM quantization serving backend, OpenAI-compatible API" \
      org.opencontainers.image.licenses="Apache-2.0"
# One stage: the wheels arrive through a bind mount and never enter a layer, so a separate build
# stage would only add a second copy of the ~1.3 GB venv to every build (disk, not image size).
# The venv holds qserve and its pinned dependencies from the wheelhouse only, without pip; the
# bytecode pip compiles stays, as the runtime root filesystem may be read-only.
RUN --mount=type=bind,from=wheels,target=/wheels \
    python3 -m venv /opt/qserve \
    && /opt/qserve/bin/pip install --no-cache-dir --no-index --find-links=/wheels /wheels/qserve-*.whl \
    && /opt/qserve/bin/pip uninstall --yes pip setuptools \
    && groupadd --system --gid "${UID}" qserve \
    && useradd --system --uid "${UID}" --gid qserve --home-dir /home/qserve --create-home \
       --shell /usr/sbin/nologin qserve
# /models/model is the mount point for a model (read-only is fine). No VOLUME instruction: it
# would copy a baked-in model into an anonymous volume on every start.
COPY --from=model / /models/model/
ENV PATH=/opt/qserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    QSERVE_MODEL=/models/model \
    QSERVE_HOST=0.0.0.0 \
    QSERVE_PORT=8000 \
    QSERVE_MEMORY_BUDGET=auto
USER ${UID}:${UID}
WORKDIR /home/qserve
EXPOSE 8000
# Liveness only (the process answers); readiness is /ready, which orchestrators probe themselves.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["/opt/qserve/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('QSERVE_PORT', '8000'), timeout=2)"]
# Exec form: SIGTERM goes straight to the server, which drains in-flight requests and exits 0.
# Run with --init (or Kubernetes' pause process) so an init reaps zombies.
ENTRYPOINT ["qserve", "serve"]
