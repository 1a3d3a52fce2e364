"""Session fixtures: variants are built once into a cached directory so a second run is fast."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from models.build import DEFAULT_KEY_PATH, BuildOptions, BuildReport, build_all
from models.signing import SigningKey, load_signing_key

#: Held-out sentences used by the tests' builds (the published build uses >= 1000).
TEST_EVAL_SENTENCES = 200
BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))


@pytest.fixture(scope="session")
def built() -> BuildReport:
    warnings.filterwarnings("ignore")
    return build_all(BuildOptions(out=BUILD_DIR, eval_sentences=TEST_EVAL_SENTENCES))


@pytest.fixture(scope="session")
def build_dir(built: BuildReport) -> Path:
    return BUILD_DIR


@pytest.fixture(scope="session")
def dev_key(built: BuildReport) -> SigningKey:
    return load_signing_key(BUILD_DIR / DEFAULT_KEY_PATH)
