# syntax=docker/dockerfile:1
# CPU image of Equipoise: the HTTP service by default (`equipoise serve`), the retraining worker with
# `equipoise worker` as the command. GPU hosts use Dockerfile.gpu. See docs/DEPLOYMENT.md.
#
#   docker build -t equipoise:0.1.0 .
#   docker build -t equipoise:0.1.0 --build-arg EXTRAS=cpu,distributed .   # with Ray for the worker
#
# Two stages: `build` installs everything into the virtual environment /opt/venv; `runtime` gets only that
# environment (no source tree, no build leftovers).

FROM python:3.11.13-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first, alone, from the CPU index: otherwise the dependency resolver takes the CUDA build from PyPI.
# The project's own `torch==2.13.0` pin is then already satisfied by 2.13.0+cpu and left alone.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Exactly one ONNX Runtime build: the `cpu` extra here (`gpu` in Dockerfile.gpu, never both).
ARG EXTRAS=cpu
WORKDIR /src
# Dependencies first, from pyproject.toml alone (all pinned exactly there), so that editing the source does
# not download them again; then the project itself, without dependencies.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ['EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt
# The whole tree (.dockerignore keeps out .venv, .git, state): whatever pyproject.toml packages is installed.
COPY . ./
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && pip check \
    && equipoise --help > /dev/null \
    && python -c "import onnxruntime, torch; assert not torch.version.cuda, torch.version.cuda; print(torch.__version__, onnxruntime.get_available_providers())"


FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="equipoise" \
      org.opencontainers.image.description="Emotion recognition in conversations: ONNX service and retraining worker (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/equipoise \
    EQUIPOISE_STATE_DIR=/var/lib/equipoise \
    EQUIPOISE_HOST=0.0.0.0 \
    EQUIPOISE_PORT=8000

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 equipoise \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/equipoise --create-home \
       --shell /usr/sbin/nologin equipoise
COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/equipoise
# State: logging spool, retraining job steps, and the model registry (<state>/models) unless
# EQUIPOISE_REGISTRY_DIR points elsewhere. A named volume mounted here inherits the equipoise ownership.
VOLUME ["/var/lib/equipoise"]
USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz): /readyz answers 503 until a model is promoted, which is not a reason to restart.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('EQUIPOISE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# `equipoise serve` migrates the database (`equipoise db upgrade`) before it starts serving.
CMD ["equipoise", "serve"]
