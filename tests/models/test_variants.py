"""Every published variant passed its gate on held-out text; a rebuild is a no-op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.build import GATES, VARIANTS, BuildOptions, BuildReport, build_all
from models.corpus import stdlib_sentences
from models.export import op_histogram
from models.manifest import MANIFEST_FILE


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_passes_its_gate(built: BuildReport, variant: str) -> None:
    manifest = built.manifests[variant]
    assert manifest.quality.samples >= 200
    assert manifest.quality_gate == GATES[variant].for_samples(manifest.quality.samples)
    assert manifest.quality_gate.failures(manifest.quality) == []


def test_small_builds_widen_only_the_top1_floor() -> None:
    gate = GATES["int8-onnx"]
    assert gate.for_samples(1200) == gate
    small = gate.for_samples(200)
    assert small.min_mean_cosine == gate.min_mean_cosine
    assert 0.91 < small.min_top1_agreement < gate.min_top1_agreement


def test_every_variant_has_artifact_and_manifest(build_dir: Path) -> None:
    for variant in VARIANTS:
        assert (build_dir / variant / MANIFEST_FILE).is_file()


def test_fp32_graph_is_fused(build_dir: Path) -> None:
    ops = op_histogram(build_dir / "fp32-onnx" / "model.onnx")
    assert ops["Attention"] == 6
    assert ops["SkipLayerNormalization"] == 12


def test_int8_graph_is_quantized(build_dir: Path) -> None:
    ops = op_histogram(build_dir / "int8-onnx" / "model.onnx")
    assert ops["MatMulInteger"] == 18  # every projection except the QKV of layers 1-5
    assert ops["QAttention"] == 1
    assert ops["Attention"] == 5  # kept in float
    assert ops["MatMul"] == ops["Gather"] - 1 == 12  # one float outlier path per FFN MatMul


def test_outlier_split_is_exact_in_float(build_dir: Path, tmp_path: Path) -> None:
    import onnx

    from models.backends import OnnxBackend, onnx_session
    from models.quantization import split_outlier_channels
    from models.tokenization import EmbeddingTokenizer

    source = build_dir / "fp32-onnx"
    tokenizer = EmbeddingTokenizer.from_file(source / "tokenizer.json")
    texts = stdlib_sentences(evaluation=50, calibration=16)
    ids, mask = tokenizer.encode_batch(texts.calibration)
    model = onnx.load(str(source / "model.onnx"))
    float_nodes = split_outlier_channels(
        model,
        scope="/feed_forward/",
        channels=8,
        batches=[{"input_ids": ids, "attention_mask": mask}],
    )
    assert len(float_nodes) == 12
    onnx.save(model, str(tmp_path / "split.onnx"))
    probe = tokenizer.encode_batch(texts.evaluation[:8])
    before = OnnxBackend(onnx_session(str(source / "model.onnx"))).embed(*probe)
    after = OnnxBackend(onnx_session(str(tmp_path / "split.onnx"))).embed(*probe)
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_rebuild_is_a_noop(build_dir: Path, built: BuildReport) -> None:
    again = build_all(BuildOptions(out=build_dir, eval_sentences=200))
    assert again.built == []
    assert set(again.cached) == set(VARIANTS)


def test_corpus_is_deterministic_and_held_out() -> None:
    first, second = stdlib_sentences(), stdlib_sentences()
    assert first.evaluation == second.evaluation
    assert len(first.evaluation) >= 1000
    assert not set(first.evaluation) & set(first.calibration)
