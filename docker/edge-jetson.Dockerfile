# Spillway edge agent for Jetson (JetPack 6.1 / L4T r36.4, aarch64).
# Build on a Jetson or with buildx for linux/arm64, from the repository root:
#   docker build -f docker/edge-jetson.Dockerfile \
#     -t ghcr.io/spillway/spillway-edge-jetson:0.1.0-r36.4 .
# Runs with runtimeClassName: nvidia (manifests/base/edge-agent.yaml). onnxruntime-gpu
# for JetPack comes from NVIDIA's Jetson AI Lab index, not PyPI (PyPI has no CUDA
# aarch64 build); the 'edge' extra carries no ONNX runtime of its own (that is the 'cpu' or 'gpu' extra), so
# the two never share the environment. No torch on the device.
# Unverified here (no Docker engine, no Jetson): that the index has a cp311 wheel of
# the pinned version; if not, pick the version it has for cp311 or use python3.10.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0

ARG ORT_GPU_VERSION=1.20.0
ARG JETSON_INDEX=https://pypi.jetson-ai-lab.dev/jp6/cu126

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
COPY edge_agent ./edge_agent
COPY models ./models
COPY sim ./sim
COPY spillway ./spillway
COPY cloud_controller ./cloud_controller
# The project itself, dependencies as ranged in pyproject.toml (no lock file yet).
# hadolint ignore=DL3013
RUN pip install '.[edge]' \
    && pip install --extra-index-url "${JETSON_INDEX}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && python -c "import importlib.metadata as m, sys; sys.exit('onnxruntime' in {d.metadata['Name'] for d in m.distributions()})" \
    && python -c "import onnxruntime as ort; print(ort.get_available_providers())"

USER 1000:1000
EXPOSE 8470
# No HEALTHCHECK: the DaemonSet restarts the agent when it exits.
HEALTHCHECK NONE
CMD ["spillway", "agent", "run"]
