"""Build, evaluate, sign and publish every variant of the encoder into ``OUT/<variant>/``.

Each variant folder holds the artifact, ``tokenizer.json`` and the signed ``manifest.json``. Builds
are
cached by content hash: a key over the checkpoint and tokenizer digests, the variant recipe and the
tool
versions is stored beside each manifest, and a variant whose key, artifact digest and signature
still
match is left untouched - so a second build is a no-op. A variant below its quality gate is not
published (its folder is removed and :class:`GateFailedError` lists why).

The dev signing key lives at ``OUT/keys/signing.key`` (public half ``signing.key.pub``) unless a key
path is given; production builds pass the release key explicitly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from models.checkpoint import MODEL_NAME, MODEL_VERSION, EncoderConfig, checkpoint_dir
from models.corpus import CorpusSplit, stdlib_sentences
from models.errors import ModelError, PermanentModelError
from models.loader import load_model, sha256_file
from models.manifest import (
    MANIFEST_FILE,
    HardwareClass,
    Manifest,
    Precision,
    RuntimeName,
    TensorSpec,
    sign,
)
from models.quality import QualityGate, QualityMetrics, compare, embed_texts
from models.quantization import Int8OnnxRecipe
from models.signing import SigningKey, keyring, load_or_create_signing_key
from models.tokenization import EmbeddingTokenizer

logger = logging.getLogger(__name__)

BUILD_KEY_FILE = "build-key.txt"
DEFAULT_KEY_PATH = Path("keys/signing.key")
RECIPE_VERSION = "3"
OPSET = 17
#: Sentences per calibration batch (unsorted, so padding is as in real batches).
CALIBRATION_BATCH = 8
#: How long a signed manifest stays valid.
MANIFEST_LIFETIME = timedelta(days=90)

FP32_ONNX = "fp32-onnx"
INT8_ONNX = "int8-onnx"
FP16_ONNX = "fp16-onnx"
FP32_TORCHSCRIPT = "fp32-torchscript"
INT8_BNB = "int8-bnb-torch"
VARIANTS = (FP32_ONNX, INT8_ONNX, FP16_ONNX, FP32_TORCHSCRIPT, INT8_BNB)

#: Publication gates, against FP32 (FP32 variants: against the eager torch reference).
GATES: dict[str, QualityGate] = {
    FP32_ONNX: QualityGate(min_mean_cosine=0.99999, min_min_cosine=0.9999, min_top1_agreement=0.99),
    FP32_TORCHSCRIPT: QualityGate(
        min_mean_cosine=0.99999, min_min_cosine=0.9999, min_top1_agreement=0.99
    ),
    FP16_ONNX: QualityGate(min_mean_cosine=0.9999, min_min_cosine=0.999, min_top1_agreement=0.95),
    # The quality target; the speed target is missed (docs/models.md, the INT8 frontier).
    INT8_ONNX: QualityGate(min_mean_cosine=0.995, min_min_cosine=0.985, min_top1_agreement=0.95),
    INT8_BNB: QualityGate(min_mean_cosine=0.99, min_min_cosine=0.97, min_top1_agreement=0.80),
}


class GateFailedError(PermanentModelError):
    """A freshly built variant is below its quality gate and was not published."""


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    key_path: Path | None = None
    force: bool = False
    #: Held-out sentences for the quality gate (>= 1000 for a publishable build).
    eval_sentences: int = 1200
    variants: tuple[str, ...] = VARIANTS


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    manifests: dict[str, Manifest] = field(default_factory=dict)


ProgressCallback = Callable[[str, str], None]


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _io_schema(output_dtype: str = "float32") -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
        TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "sequence"]),
    ]
    return inputs, [TensorSpec(name="embedding", dtype=output_dtype, shape=["batch", 384])]


@dataclass
class _Context:
    """Lazily built inputs shared by the variants of one build."""

    options: BuildOptions
    source: Path
    work: Path
    source_digest: str
    tokenizer_digest: str
    _corpus: CorpusSplit | None = None
    _tokenizer: EmbeddingTokenizer | None = None
    _encoder: Any = None
    _reference: Any = None
    _fp32_onnx: Path | None = None
    _fp32_embeddings: Any = None

    @property
    def corpus(self) -> CorpusSplit:
        if self._corpus is None:
            self._corpus = stdlib_sentences(evaluation=self.options.eval_sentences)
        return self._corpus

    @property
    def tokenizer(self) -> EmbeddingTokenizer:
        if self._tokenizer is None:
            self._tokenizer = EmbeddingTokenizer.from_file(self.source / "tokenizer.json")
        return self._tokenizer

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from models.encoder import load_encoder

            self._encoder = load_encoder(self.source)
        return self._encoder

    def calibration_feeds(self) -> list[dict[str, Any]]:
        """Token batches of the calibration split (never evaluated), padded like real traffic."""
        texts = self.corpus.calibration
        feeds = []
        for start in range(0, len(texts), CALIBRATION_BATCH):
            ids, mask = self.tokenizer.encode_batch(texts[start : start + CALIBRATION_BATCH])
            feeds.append({"input_ids": ids, "attention_mask": mask})
        return feeds

    def reference_embeddings(self) -> Any:
        """Eager torch FP32 embeddings of the evaluation text (the FP32 variants' reference)."""
        if self._reference is None:
            from models.backends import TorchBackend

            backend = TorchBackend(self.encoder)
            self._reference = embed_texts(backend, self.tokenizer, self.corpus.evaluation)
        return self._reference

    def fp32_onnx(self) -> Path:
        """Optimized FP32 ONNX graph (built once, shared by the INT8 and FP16 recipes)."""
        if self._fp32_onnx is None:
            from models.export import export_onnx, optimize_onnx

            raw = export_onnx(self.encoder, self.work / "raw.onnx", opset=OPSET)
            config = self.encoder.config
            self._fp32_onnx = optimize_onnx(
                raw,
                self.work / "fp32.onnx",
                num_heads=config.num_heads,
                hidden_size=config.hidden_size,
            )
        return self._fp32_onnx

    def fp32_embeddings(self) -> Any:
        """FP32 ONNX embeddings of the evaluation text (the reduced-precision reference)."""
        if self._fp32_embeddings is None:
            from models.backends import OnnxBackend, onnx_session

            backend = OnnxBackend(onnx_session(str(self.fp32_onnx())))
            self._fp32_embeddings = embed_texts(backend, self.tokenizer, self.corpus.evaluation)
        return self._fp32_embeddings


def _build_artifact(variant: str, ctx: _Context, staging: Path) -> tuple[Path, QualityMetrics]:
    """Write ``variant``'s artifact into ``staging`` and measure it; returns (artifact, metrics)."""
    from models.backends import OnnxBackend, TorchBackend, onnx_session

    corpus = ctx.corpus
    if variant == FP32_ONNX:
        artifact = staging / "model.onnx"
        shutil.copyfile(ctx.fp32_onnx(), artifact)
        reference, candidate = ctx.reference_embeddings(), ctx.fp32_embeddings()
    elif variant in (INT8_ONNX, FP16_ONNX):
        artifact = staging / "model.onnx"
        if variant == INT8_ONNX:
            from models.quantization import quantize_onnx_int8

            quantize_onnx_int8(
                ctx.fp32_onnx(), artifact, Int8OnnxRecipe(), calibration=ctx.calibration_feeds()
            )
        else:
            from models.export import convert_fp16

            convert_fp16(ctx.fp32_onnx(), artifact)
        backend = OnnxBackend(onnx_session(str(artifact)))
        reference = ctx.fp32_embeddings()
        candidate = embed_texts(backend, ctx.tokenizer, corpus.evaluation)
    elif variant == FP32_TORCHSCRIPT:
        import torch

        artifact = staging / "model.pt"
        ids, mask = ctx.tokenizer.encode_batch(["trace me", "a longer tracing sentence"])
        with torch.no_grad():
            traced = torch.jit.trace(ctx.encoder, (torch.from_numpy(ids), torch.from_numpy(mask)))
        traced.save(str(artifact))
        reference = ctx.reference_embeddings()
        loaded = torch.jit.load(str(artifact))
        candidate = embed_texts(TorchBackend(loaded), ctx.tokenizer, corpus.evaluation)
    elif variant == INT8_BNB:
        from safetensors.torch import save_file

        from models.quantization import bnb_int8_encoder

        artifact = staging / "model.int8.safetensors"
        int8 = bnb_int8_encoder(ctx.encoder)
        save_file({k: v.contiguous() for k, v in int8.state_dict().items()}, str(artifact))
        reference = ctx.fp32_embeddings()
        candidate = embed_texts(TorchBackend(int8), ctx.tokenizer, corpus.evaluation)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return artifact, compare(reference, candidate, corpus=corpus.source)


_VARIANT_FACTS: dict[str, tuple[Precision, RuntimeName, list[HardwareClass]]] = {
    FP32_ONNX: (
        Precision.FP32,
        RuntimeName.ONNXRUNTIME,
        [HardwareClass.X86_CPU, HardwareClass.ARM_CPU, HardwareClass.NVIDIA_GPU],
    ),
    INT8_ONNX: (
        Precision.INT8,
        RuntimeName.ONNXRUNTIME,
        [HardwareClass.X86_CPU, HardwareClass.ARM_CPU, HardwareClass.JETSON],
    ),
    FP16_ONNX: (Precision.FP16, RuntimeName.ONNXRUNTIME, [HardwareClass.NVIDIA_GPU]),
    FP32_TORCHSCRIPT: (
        Precision.FP32,
        RuntimeName.TORCH,
        [HardwareClass.X86_CPU, HardwareClass.NVIDIA_GPU],
    ),
    INT8_BNB: (
        Precision.INT8,
        RuntimeName.TORCH,
        [HardwareClass.X86_CPU, HardwareClass.NVIDIA_GPU],
    ),
}


def _manifest(
    variant: str,
    artifact: Path,
    tokenizer: Path,
    metrics: QualityMetrics,
    *,
    release: int,
    now: datetime,
) -> Manifest:
    precision, runtime, hardware = _VARIANT_FACTS[variant]
    inputs, outputs = _io_schema()
    size = artifact.stat().st_size
    is_onnx = runtime is RuntimeName.ONNXRUNTIME
    return Manifest(
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        variant=variant,
        precision=precision,
        runtime=runtime,
        min_runtime_version="1.18" if is_onnx else "2.4",
        opset=OPSET if is_onnx else None,
        artifact=artifact.name,
        sha256=sha256_file(artifact),
        size_bytes=size,
        tokenizer=tokenizer.name,
        tokenizer_sha256=sha256_file(tokenizer),
        max_sequence_length=EncoderConfig().max_seq_length,
        inputs=inputs,
        outputs=outputs,
        quality=metrics,
        quality_gate=GATES[variant].for_samples(metrics.samples),
        target_hardware=hardware,
        # Weights resident twice while the runtime initialises, plus batch-32 activations.
        memory_bytes=2 * size + (256 << 20),
        created_at=now,
        release=release,
        expires_at=now + MANIFEST_LIFETIME,
    )


def _build_key(variant: str, ctx: _Context) -> str:
    recipe = {
        "recipe": RECIPE_VERSION,
        "variant": variant,
        "weights": ctx.source_digest,
        "tokenizer": ctx.tokenizer_digest,
        "int8": Int8OnnxRecipe().model_dump(mode="json") if variant == INT8_ONNX else None,
        "gate": GATES[variant].for_samples(ctx.options.eval_sentences).model_dump(mode="json"),
        "eval_sentences": ctx.options.eval_sentences,
        "tools": {d: _dist_version(d) for d in ("torch", "onnx", "onnxruntime", "bitsandbytes")},
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _is_current(folder: Path, key: str, signing_key: SigningKey) -> bool:
    """The published folder matches ``key`` and still loads with a valid signature."""
    key_file = folder / BUILD_KEY_FILE
    if not key_file.is_file() or key_file.read_text().strip() != key:
        return False
    try:
        load_model(
            folder,
            trusted_keys=keyring([signing_key.public_key]),
            available_memory_bytes=1 << 62,
        )
    except ModelError as exc:
        logger.info("rebuilding %s: %s", folder.name, exc)
        return False
    return True


def _previous_release(folder: Path) -> int:
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_text())
        return int(raw["manifest"]["release"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def build_all(options: BuildOptions, *, progress: ProgressCallback | None = None) -> BuildReport:
    """Build every requested variant into ``options.out``; see the module docstring."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    signing_key = load_or_create_signing_key(options.key_path or out / DEFAULT_KEY_PATH)
    source = checkpoint_dir()
    report = BuildReport()
    notify = progress or (lambda variant, step: None)
    with tempfile.TemporaryDirectory(prefix="spillway-build-") as tmp:
        ctx = _Context(
            options=options,
            source=source,
            work=Path(tmp),
            source_digest=sha256_file(source / "model.safetensors"),
            tokenizer_digest=sha256_file(source / "tokenizer.json"),
        )
        for variant in options.variants:
            folder = out / variant
            key = _build_key(variant, ctx)
            if not options.force and _is_current(folder, key, signing_key):
                notify(variant, "cached")
                report.cached.append(variant)
                report.manifests[variant] = Manifest.model_validate(
                    json.loads((folder / MANIFEST_FILE).read_text())["manifest"]
                )
                continue
            notify(variant, "building")
            staging = Path(tmp) / variant
            staging.mkdir()
            artifact, metrics = _build_artifact(variant, ctx, staging)
            failures = GATES[variant].for_samples(metrics.samples).failures(metrics)
            if failures:
                shutil.rmtree(folder, ignore_errors=True)
                raise GateFailedError(f"{variant} not published: {'; '.join(failures)}")
            tokenizer = staging / "tokenizer.json"
            shutil.copyfile(source / "tokenizer.json", tokenizer)
            manifest = _manifest(
                variant,
                artifact,
                tokenizer,
                metrics,
                release=_previous_release(folder) + 1,
                now=datetime.now(UTC),
            )
            signed = sign(manifest, signing_key)
            (staging / MANIFEST_FILE).write_text(signed.model_dump_json(indent=2))
            (staging / BUILD_KEY_FILE).write_text(key + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(str(staging), folder)  # publish the whole folder at once
            notify(variant, "built")
            report.built.append(variant)
            report.manifests[variant] = manifest
            logger.info(
                "%s: mean %.5f min %.5f top1 %.4f",
                variant,
                metrics.mean_cosine,
                metrics.min_cosine,
                metrics.top1_agreement,
            )
    return report
