"""Every published variant passed its gate on held-out text; a rebuild is a no-op."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import GATES, VARIANTS, BuildOptions, BuildReport, build_all
from models.corpus import stdlib_sentences
from models.export import op_histogram
from models.manifest import MANIFEST_FILE


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_passes_its_gate(built: BuildReport, variant: str) -> None:
    manifest = built.manifests[variant]
    assert GATES[variant].failures(manifest.quality) == []
    assert manifest.quality.samples >= 200


def test_every_variant_has_artifact_and_manifest(build_dir: Path) -> None:
    for variant in VARIANTS:
        assert (build_dir / variant / MANIFEST_FILE).is_file()


def test_fp32_graph_is_fused(build_dir: Path) -> None:
    ops = op_histogram(build_dir / "fp32-onnx" / "model.onnx")
    assert ops["Attention"] == 6
    assert ops["SkipLayerNormalization"] == 12


def test_int8_graph_is_quantized(build_dir: Path) -> None:
    ops = op_histogram(build_dir / "int8-onnx" / "model.onnx")
    assert ops["QAttention"] == 6
    assert ops["MatMul"] == 2  # the sensitive nodes kept in float


def test_rebuild_is_a_noop(build_dir: Path, built: BuildReport) -> None:
    again = build_all(BuildOptions(out=build_dir, eval_sentences=200))
    assert again.built == []
    assert set(again.cached) == set(VARIANTS)


def test_corpus_is_deterministic_and_held_out() -> None:
    first, second = stdlib_sentences(), stdlib_sentences()
    assert first.evaluation == second.evaluation
    assert len(first.evaluation) >= 1000
    assert not set(first.evaluation) & set(first.calibration)
