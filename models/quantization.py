"""Reduced-precision variants: INT8 ONNX (ONNX Runtime dynamic quantization) and INT8 torch
(bitsandbytes).

INT8 ONNX recipe, chosen by measurement on this project's held-out stdlib text (docs/models.md has
the frontier): start from the *fused* FP32 graph, int8 weights per output channel, activations
quantized dynamically per tensor (``DynamicQuantizeMatMul`` at run time), and

* **outlier channels in float** for the feed-forward MatMuls: a few hidden channels (the classic
  BERT LayerNorm outlier dims, and the largest GELU outputs) reach 20-30 while the median channel
  stays near 2, so a per-tensor activation scale wastes most of the 8 bits on them. Those
  ``outlier_channels`` input channels (largest ``|activation|`` on the *calibration* split) are
  zeroed on the int8 path and computed by a small float MatMul added back::

      y = DynamicQuantizeMatMul(x * inlier_mask, W) + Gather(x, outliers) @ W[outliers]

  This is exact in float and cuts the FFN MatMuls' relative output error 3-5x.
* the fused ``Attention`` nodes of layers 1-5 **kept in float** (``keep_float``): with the FFN
  fixed, quantizing any one of them costs ~0.3-1 point of top-1 agreement.

SmoothQuant-style scale migration was measured and rejected: it lowers the per-node output error yet
raises the end-to-end error on this model.

The bitsandbytes variant swaps every encoder ``nn.Linear`` for ``Linear8bitLt`` (LLM.int8 with
outlier decomposition). It cannot be serialised with TorchScript (bnb's autograd ``Function`` is
not scriptable), so its artifact is a safetensors state dict loaded into eager modules.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

Feeds = Mapping[str, npt.NDArray[np.int64]]


class Int8OnnxRecipe(BaseModel):
    """Knobs of the INT8 ONNX recipe; part of the build cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op_types: tuple[str, ...] = ("MatMul", "Attention")
    per_channel: bool = True
    reduce_range: bool = False
    #: Input channels per split MatMul computed in float (0: no outlier split).
    outlier_channels: int = 8
    #: MatMul nodes whose name contains this get the outlier split.
    outlier_scope: str = "/feed_forward/"
    #: Nodes left in float entirely.
    keep_float: tuple[str, ...] = tuple(f"Attention_{i}" for i in range(1, 6))


def channel_absmax(
    model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[Feeds]
) -> dict[str, npt.NDArray[np.float32]]:
    """Largest ``|value|`` per last-axis channel of each named tensor over ``batches`` (padding
    included: the int8 path sees padded positions too)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted(set(tensors))
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    absmax: dict[str, npt.NDArray[np.float32]] = {}
    for feeds in batches:
        for name, value in zip(names, session.run(names, dict(feeds)), strict=True):
            flat = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1])
            absmax[name] = np.maximum(absmax.get(name, 0.0), flat.max(axis=0))  # (K,)
    if not absmax:
        raise ValueError("no calibration batches")
    return absmax


def split_outlier_channels(
    model: onnx.ModelProto, *, scope: str, channels: int, batches: Iterable[Feeds]
) -> list[str]:
    """Rewrite ``model`` in place so each in-scope MatMul runs its ``channels`` largest input
    channels in float beside the rest; returns the names of the new float MatMuls (keep them out
    of quantization). The rewritten graph computes the same function in float."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    targets = [
        n for n in graph.node if n.op_type == "MatMul" and scope in n.name and n.input[1] in weights
    ]
    if not targets or channels <= 0:
        return []
    absmax = channel_absmax(model, (n.input[0] for n in targets), batches)
    float_nodes: list[str] = []
    rewritten: list[onnx.NodeProto] = []
    target_names = {n.name for n in targets}
    for node in graph.node:
        if node.name not in target_names:
            rewritten.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])  # (K, N)
        outliers = np.sort(np.argsort(-absmax[node.input[0]])[:channels]).astype(np.int64)
        inlier_mask = np.ones(w.shape[0], dtype=np.float32)
        inlier_mask[outliers] = 0.0
        base = node.name.strip("/").replace("/", "_")
        graph.initializer.extend(
            [
                numpy_helper.from_array(inlier_mask, f"{base}_inlier_mask"),
                numpy_helper.from_array(outliers, f"{base}_outlier_index"),
                numpy_helper.from_array(np.ascontiguousarray(w[outliers]), f"{base}_outlier_w"),
            ]
        )
        x, y = node.input[0], node.output[0]
        float_matmul = f"{node.name}_outliers"
        rewritten += [
            helper.make_node(
                "Mul", [x, f"{base}_inlier_mask"], [f"{base}_inliers"], name=f"{node.name}_inliers"
            ),
            helper.make_node(
                "Gather",
                [x, f"{base}_outlier_index"],
                [f"{base}_outlier_x"],
                name=f"{node.name}_gather_outliers",
                axis=-1,
            ),  # (B, T, channels)
            helper.make_node(
                "MatMul",
                [f"{base}_outlier_x", f"{base}_outlier_w"],
                [f"{base}_outlier_y"],
                name=float_matmul,
            ),
        ]
        node.input[0], node.output[0] = f"{base}_inliers", f"{base}_inlier_y"
        rewritten.append(node)
        rewritten.append(
            helper.make_node(
                "Add", [f"{base}_inlier_y", f"{base}_outlier_y"], [y], name=f"{node.name}_sum"
            )
        )
        float_nodes.append(float_matmul)
    del graph.node[:]
    graph.node.extend(rewritten)
    logger.info("int8: %d MatMuls split, %d float channels each", len(targets), channels)
    return float_nodes


def quantize_onnx_int8(
    source: Path, target: Path, recipe: Int8OnnxRecipe, *, calibration: Iterable[Feeds]
) -> Path:
    """INT8 ``target`` from ``source`` (an optimized FP32 graph); ``calibration`` batches pick
    the outlier channels and must be disjoint from the evaluation text."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    candidates = [n.name for n in model.graph.node if n.op_type in recipe.op_types]
    unknown = set(recipe.keep_float) - set(candidates)
    if unknown:
        raise ValueError(f"keep_float names nodes not in the graph: {sorted(unknown)}")
    float_nodes = split_outlier_channels(
        model, scope=recipe.outlier_scope, channels=recipe.outlier_channels, batches=calibration
    )
    with tempfile.TemporaryDirectory(prefix="spillway-int8-") as tmp:
        split = Path(tmp) / "split.onnx"
        onnx.save(model, str(split))
        quantize_dynamic(
            str(split),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            op_types_to_quantize=list(recipe.op_types),
            nodes_to_exclude=[*recipe.keep_float, *float_nodes],
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
