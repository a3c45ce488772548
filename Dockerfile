# syntax=docker/dockerfile:1
# embedserve images (README, "Container images"):
#   docker build --target gateway -t embedserve/gateway:0.1.0 .   # the default target: slim, no torch
#   docker build --target trainer -t embedserve/trainer:0.1.0 .   # torch with CUDA, for GPU nodes
# Both run as uid 10001 and keep nothing in the image's filesystem at run time, so they run with a
# read-only root filesystem; the model repository is mounted at /models (or pulled into it at start).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- gateway-build: the gateway's dependencies in a virtualenv (pyproject's base dependencies only) ----
FROM ${PYTHON_IMAGE} AS gateway-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY client ./client
# Only the triton extra: torch, transformers and the trainer stay out of the gateway image.
RUN pip install --no-cache-dir "/src[triton]" \
    && python -c "import sys, service.app; assert 'torch' not in sys.modules"

# ---- trainer: torch with CUDA (PyPI's Linux x86_64 torch wheels bundle the CUDA runtime; the node's
# NVIDIA driver comes in through the NVIDIA container toolkit). Also runs on CPU nodes. ----
FROM ${PYTHON_IMAGE} AS trainer
LABEL org.opencontainers.image.title="embedserve trainer" \
      org.opencontainers.image.description="Self-supervised encoder training and export (torch, CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN groupadd --system --gid 10001 embedserve \
    && useradd --system --uid 10001 --gid embedserve --create-home --home-dir /home/embedserve \
       --shell /usr/sbin/nologin embedserve \
    && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY trainer ./trainer
COPY client ./client
RUN pip install --no-cache-dir "/src[train,triton]" \
    && python -c "import torch, trainer.train; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/embedserve \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
# Mount the corpus, runs/ (checkpoints) and model_repository/ under /workspace.
WORKDIR /workspace
USER 10001:10001
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]

# ---- gateway: what runs in production (the last stage, so a plain `docker build .` builds it) ----
FROM ${PYTHON_IMAGE} AS gateway
LABEL org.opencontainers.image.title="embedserve gateway" \
      org.opencontainers.image.description="OpenAI-compatible embeddings and vector search gateway (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 embedserve \
    && useradd --system --uid 10001 --gid embedserve --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin embedserve \
    && mkdir -p /models /data \
    && chown embedserve:embedserve /data
COPY --from=gateway-build /opt/venv /opt/venv
# Bytecode is compiled at build time; caches and temporary files go to /tmp (an emptyDir in the chart).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=8000 \
    EMBEDSERVE_MODEL_REPOSITORY=/models \
    EMBEDSERVE_MILVUS_URI=/data/milvus.db
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# /healthz answers once every verified version is loaded (loading MiniLM takes seconds; larger models longer).
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMBEDSERVE_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve"]
