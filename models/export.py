"""Export the torch encoder to ONNX and apply ONNX Runtime's transformer graph optimizations.

The exported graph has inputs ``input_ids``/``attention_mask`` (int64, ``(batch, sequence)``, both
axes
dynamic) and one output ``embedding`` (float, ``(batch, 384)``, already pooled and L2-normalised),
so every
runtime sees the same schema. The optimizer fuses the attention subgraph, LayerNorm+residual and
bias+GELU; the fused graph is what the FP32 variant ships and what INT8 and FP16 start from.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx
import torch

from models.encoder import SentenceEncoder

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


def export_onnx(model: SentenceEncoder, path: Path, *, opset: int = OPSET) -> Path:
    """Trace ``model`` into an ONNX file with dynamic batch and sequence axes (unoptimized)."""
    model = model.eval()
    input_ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=torch.int64)
    attention_mask = (input_ids != 0).to(torch.int64)
    dynamic = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (input_ids, attention_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAMES[0]: dynamic,
                INPUT_NAMES[1]: dynamic,
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    logger.info("exported %s", path)
    return path


def optimize_onnx(source: Path, target: Path, *, num_heads: int, hidden_size: int) -> Path:
    """Fuse attention / SkipLayerNorm / BiasGelu with ORT's BERT optimizer; writes ``target``."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(source),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=1,
        use_gpu=False,
        only_onnxruntime=False,
    )
    optimized.save_model_to_file(str(target))
    logger.info("optimized graph ops: %s", dict(op_histogram(target)))
    return target


def op_histogram(path: Path) -> Counter[str]:
    """Count of each op type in a model (used to check which fusions happened)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def convert_fp16(source: Path, target: Path) -> Path:
    """Half-precision copy of an (optimized) graph, keeping int64 inputs and a float32 output."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(target))
    return target
