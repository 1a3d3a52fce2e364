"""Reduced-precision variants: INT8 ONNX (ONNX Runtime dynamic quantization) and INT8 torch
(bitsandbytes).

INT8 ONNX recipe, chosen by measurement on this project's held-out stdlib text (see docs/models.md):
quantize the *fused* FP32 graph (so ``Attention`` becomes ``QAttention`` and the MatMuls become
``DynamicQuantizeMatMul``), int8 weights per output channel, activations quantized dynamically per
tensor, and keep the most quantization-sensitive nodes in float. Sensitivity was measured node by
node:
the first layers' FFN output projections (their GELU inputs have the largest activation outliers)
cost
the most cosine, the attention output projections almost none.

The bitsandbytes variant swaps every encoder ``nn.Linear`` for ``Linear8bitLt`` (LLM.int8 with
outlier
decomposition). It cannot be serialised with TorchScript (bnb's autograd ``Function`` is not
scriptable), so its artifact is a safetensors state dict loaded into eager modules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)


class Int8OnnxRecipe(BaseModel):
    """Knobs of ORT dynamic quantization; part of the build cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op_types: tuple[str, ...] = ("MatMul", "Attention")
    per_channel: bool = True
    reduce_range: bool = False
    keep_float: tuple[str, ...] = (
        "/layers.0/feed_forward/output/MatMul",
        "/layers.1/feed_forward/output/MatMul",
    )


def quantize_onnx_int8(source: Path, target: Path, recipe: Int8OnnxRecipe) -> Path:
    """Dynamic INT8 quantization of ``source`` (an optimized FP32 graph) into ``target``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    candidates = [n.name for n in graph.node if n.op_type in recipe.op_types]
    unknown = set(recipe.keep_float) - set(candidates)
    if unknown:
        raise ValueError(f"keep_float names nodes not in the graph: {sorted(unknown)}")
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        op_types_to_quantize=list(recipe.op_types),
        nodes_to_exclude=list(recipe.keep_float),
        # Fused contrib ops defeat ORT's shape inference; their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    logger.info("int8: quantized %d nodes", len(candidates) - len(recipe.keep_float))
    return target


def bnb_int8_encoder(model: Any, *, threshold: float = 6.0) -> Any:
    """Copy of ``model`` (a :class:`~models.encoder.SentenceEncoder`) with bnb ``Linear8bitLt``
    layers.

    ``threshold`` is LLM.int8's outlier magnitude: activation columns above it run in float.
    """
    import copy

    from bitsandbytes.nn import Int8Params, Linear8bitLt
    from torch import nn

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            int8 = Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                has_fp16_weights=False,
                threshold=threshold,
            )
            int8.weight = Int8Params(
                child.weight.data.clone(), requires_grad=False, has_fp16_weights=False
            )
            if child.bias is not None:
                int8.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, int8.to("cpu"))  # .to() performs the int8 quantization
    return model.eval()
