# Spillway cloud image, GPU: pool ranks on CUDA (NCCL); the controller runs from it too.
# Build from the repository root:
#   docker build -f docker/cloud-gpu.Dockerfile -t ghcr.io/spillway/spillway:0.1.0-cuda .
# torch==2.13.0 (the 'cloud' extra) brings its own CUDA libraries from PyPI; the base
# image supplies the driver-facing runtime. The 'gpu' extra brings onnxruntime-gpu (for
# building and checking the FP16 variant on CUDA); the CPU onnxruntime is never installed
# beside it. Kubernetes probes are in manifests/; HEALTHCHECK is for `docker run`.
FROM docker.io/nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && groupadd --gid 1000 spillway \
    && useradd --uid 1000 --gid 1000 --home-dir /home/spillway --create-home spillway
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/spillway
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY cloud_controller ./cloud_controller
COPY edge_agent ./edge_agent
COPY models ./models
COPY sim ./sim
COPY spillway ./spillway
# The project itself, dependencies as ranged in pyproject.toml (no lock file yet).
# hadolint ignore=DL3013
RUN pip install '.[cloud,gpu]'

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["spillway", "controller", "serve", "--host", "0.0.0.0"]
