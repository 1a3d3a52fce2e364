# Spillway cloud image, CPU: controller, pool supervisor and pool ranks (torch, gloo).
# Build from the repository root:
#   docker build -f docker/cloud-cpu.Dockerfile -t ghcr.io/spillway/spillway:0.1.0 .
# Kubernetes probes (/healthz, /readyz) are in manifests/base/controller.yaml; the
# HEALTHCHECK below is for plain `docker run` of the controller.
FROM docker.io/library/python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 1000 spillway \
    && useradd --uid 1000 --gid 1000 --home-dir /home/spillway --create-home spillway

WORKDIR /opt/spillway
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY cloud_controller ./cloud_controller
COPY edge_agent ./edge_agent
COPY models ./models
COPY sim ./sim
COPY spillway ./spillway
# torch==2.13.0 comes from the 'cloud' extra; the CPU wheel index keeps CUDA out.
# The project itself, dependencies as ranged in pyproject.toml (no lock file yet).
# hadolint ignore=DL3013
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[cloud,cpu]'

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["spillway", "controller", "serve", "--host", "0.0.0.0"]
