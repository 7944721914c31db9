# syntax=docker/dockerfile:1
#
# embedapi, GPU image (CUDA).
#
#   docker build -f Dockerfile -t embedapi:gpu .
#   docker run --gpus all -p 8000:8000 -v embedapi-hf-cache:/cache/huggingface embedapi:gpu
#
# Build arguments:
#   PRELOAD_MODELS  space-separated model ids to bake into the image, e.g.
#                   --build-arg PRELOAD_MODELS="cl-nagoya/ruri-v3-310m cl-nagoya/ruri-v3-reranker-310m"
#                   (default empty: models are downloaded at start-up into the /cache/huggingface volume).
#   CUDA_VERSION    tag of the nvidia/cuda base: keep it on the CUDA line the torch wheel brings (below).
#   PIP_VERSION     pip used inside the virtualenv.
#
# Torch comes from requirements-gpu.txt: PyPI's Linux x86_64 torch 2.13.0 is the CUDA 13.0 build and
# brings its own CUDA 13.0 libraries (cuda-toolkit 13.0.3, cuDNN 9.20) as pip packages, so the base only
# needs the `base` flavour (no second copy of cuBLAS/cuDNN). The base's CUDA line matters anyway: its
# NVIDIA_REQUIRE_CUDA makes the NVIDIA container toolkit refuse a host driver too old for it at `docker
# run`, with a clear message, instead of torch silently seeing no GPU.
#
# Host requirements (docs/gpu.md): NVIDIA driver >= 580.65.06 (CUDA 13.0) and a GPU of compute capability
# 7.5 or newer (T4, A10/A100, L4/L40S, H100/H200, ...): CUDA 13 no longer builds for Maxwell, Pascal or
# Volta (V100); for those, build with the PyTorch cu126 wheel and CUDA_VERSION=12.6.3.
# Not built here (no Docker engine or GPU on the development machines): hadolint checks it in CI.

ARG CUDA_VERSION=13.0.2

# ---------------------------------------------------------------------------
# base: minimal CUDA base + the distribution's Python 3.11 (Ubuntu 22.04 universe).
# ---------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04 AS base

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3.11 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------
# builder: virtualenv with every Python dependency (no compilers needed: all wheels).
# ---------------------------------------------------------------------------
FROM base AS builder

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

ARG PIP_VERSION=25.3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir "pip==${PIP_VERSION}"

# requirements-gpu.txt may include requirements.txt (-r), so both are copied.
COPY requirements.txt requirements-gpu.txt /tmp/req/
RUN /opt/venv/bin/python -m pip install --no-cache-dir -r /tmp/req/requirements-gpu.txt

# ---------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------
FROM base AS runtime

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    HF_HOME=/cache/huggingface \
    EMBEDAPI_DEVICE=cuda \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    APP_PORT=8000

# EMBEDAPI_DEVICE=cuda: one worker per visible GPU, each restricted to its own (CUDA_VISIBLE_DEVICES). A GPU
# image that cannot use its GPU fails its workers loudly (each exits with a back-off and /health says 503)
# rather than serving at CPU speed; set auto to fall back to CPU instead (with a warning in the log).
# expandable_segments: batches change shape all the time; growing segments instead of fixed blocks keeps the
# caching allocator from fragmenting into out-of-memory errors with memory still free.

# Non-root user (uid/gid 1000) that owns the model caches; the code stays root-owned (read-only for it).
RUN groupadd --gid 1000 app \
 && useradd --uid 1000 --gid app --no-log-init --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /cache/huggingface /opt/models-cache \
 && chown app:app /cache/huggingface /opt/models-cache

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY embedapi/ ./embedapi/
COPY wsgi.py gunicorn.conf.py ./

# Numeric, so runtimes can verify runAsNonRoot without reading /etc/passwd.
USER 1000:1000

# Optional: bake models into the image.
#
# They are NOT baked into /cache/huggingface: that path is a VOLUME, and whatever volume is
# mounted there (an existing named volume, a bind mount, a Kubernetes volume) would shadow the
# baked files. They go to /opt/models-cache instead, and when PRELOAD_MODELS is non-empty HF_HOME
# is switched to it (below), so the baked models are found without any download. The
# /cache/huggingface volume is then unused; models not baked in are still downloaded on demand,
# but only into the container's writable layer. To keep those too, mount the volume at
# /opt/models-cache instead (a new, empty named volume is first filled from the image there).
# Downloading needs no GPU (a builder has none), hence EMBEDAPI_DEVICE=cpu for this step only.
ARG PRELOAD_MODELS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [[ -n "${PRELOAD_MODELS}" ]]; then \
      read -r -a models <<<"${PRELOAD_MODELS}"; \
      HF_HOME=/opt/models-cache EMBEDAPI_DEVICE=cpu python -m embedapi download "${models[@]}"; \
    fi
# PRELOADED_HF_HOME is /opt/models-cache when models were baked in, empty otherwise.
ENV PRELOADED_HF_HOME=${PRELOAD_MODELS:+/opt/models-cache}
ENV HF_HOME=${PRELOADED_HF_HOME:-/cache/huggingface}

VOLUME ["/cache/huggingface"]
EXPOSE 8000

# Loading a 310m model (and downloading it on first start) takes a while: generous start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('APP_PORT', '8000'), timeout=8)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
