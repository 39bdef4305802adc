"""fold-shapes: a Reshape whose target is computed from its own input's shape gets a constant target.

Exporters write multi-head attention's reshapes as::

    Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [12], [32]))

which copies ``x``'s first two dimensions and splits the last. ONNX Reshape already says "copy
this dimension" with a 0 in the target (when ``allowzero`` is 0), so the target is the constant
``[0, 0, 12, 32]``. A piece of the Concat folds when it is

- a constant 1-D integer tensor: its values, kept where they are (a 0 or -1 in it means what it
  meant before, at the same position), or
- ``Unsqueeze(Gather(Shape(x), i), axes=[0])`` at position ``i`` of the target, where ``x`` is
  the Reshape's own data input: the code 0, "copy dimension i of x", says exactly that.

Anything else (a dimension moved to another position, the shape of another tensor, a Slice of a
Shape, whose clamping needs the rank, a Reshape with ``allowzero=1``, a Shape with
``start``/``end``) is left alone with the reason. The shape
nodes that no longer feed anything are removed by ``cleanup``.

Why: onnxruntime folds this pattern itself at session start (its ReshapeFusion), but not once
QuantizeLinear/DequantizeLinear sit on ``x``: the QDQ rewrites move the Reshape onto the
quantized tensor first. On paraphrase-MiniLM-L3 the 14 unfused shape chains (31 Shape, 32
Gather, 34 Unsqueeze, 15 Concat nodes at run time) made the quantized model slower than
onnxruntime's own, whose quantizer had folded them while preparing the model. TensorRT also
prefers static reshape targets.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import ClassVar

import numpy as np
from onnx import NodeProto

from ..graph.build import add_initializer
from ..graph.names import NameAllocator
from ..graph.model import Model
from ..graph.query import GraphIndex, attr, constant_array
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register


class _NoFold(Exception):
    pass


@register
@dataclasses.dataclass(frozen=True)
class FoldShapes(Transform):
    """Constant Reshape targets where the computed target only copies the input's own dimensions."""

    name: ClassVar[str] = "fold-shapes"

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        g = model.graph
        idx = GraphIndex(g)
        names = NameAllocator(g)
        skipped: list[Skip] = []
        targets: dict[int, np.ndarray] = {}
        for i, node in enumerate(idx.nodes):
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            if idx.is_constant(node.input[1]):
                continue
            try:
                targets[i] = _target(model, idx, node)
            except _NoFold as exc:
                skipped.append(Skip(node.name, node.op_type, str(exc)))
        for i, target in targets.items():
            node = idx.nodes[i]
            node.input[1] = add_initializer(g, names, f"{node.name or node.output[0]}_shape", target)
        return TransformResult(model, bool(targets), counts_of(self.name, Counter(reshape=len(targets))), skipped)


def _target(model: Model, idx: GraphIndex, reshape: NodeProto) -> np.ndarray:
    if int(attr(reshape, "allowzero", 0)) != 0:
        raise _NoFold("allowzero=1: a 0 in the target means an empty dimension, not a copy")
    data = reshape.input[0]
    concat = idx.producer_of(reshape.input[1])
    pieces = [reshape.input[1]]
    if concat is not None and concat.op_type == "Concat" and concat.domain in ("", "ai.onnx"):
        pieces = list(concat.input)
    values: list[int] = []
    for name in pieces:
        values.extend(_piece(model, idx, name, data, len(values)))
    return np.asarray(values, np.int64)


def _piece(model: Model, idx: GraphIndex, name: str, data: str, at: int) -> list[int]:
    """The target values ``name`` contributes at position ``at``, or _NoFold."""
    const = constant_array(model, idx, name)
    if const is not None:
        if const.ndim != 1 or const.dtype.kind not in "iu":
            raise _NoFold(f"target piece '{name}' is a constant of shape {list(const.shape)} ({const.dtype}), not a 1-D integer list")
        return [int(v) for v in const]
    node = idx.producer_of(name)
    if node is not None and node.op_type == "Unsqueeze" and node.domain in ("", "ai.onnx"):
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            a = constant_array(model, idx, node.input[1])
            axes = None if a is None else [int(v) for v in np.ravel(a)]
        if axes is None or list(axes) not in ([0], [-1]):
            raise _NoFold(f"target piece '{name}' is an Unsqueeze with axes {axes}, not [0]")
        gather = idx.producer_of(node.input[0])
        if gather is None or gather.op_type != "Gather" or int(attr(gather, "axis", 0)) != 0:
            raise _NoFold(f"target piece '{name}' does not come from Gather(Shape(...))")
        index = constant_array(model, idx, gather.input[1])
        if index is None or index.ndim != 0:
            raise _NoFold(f"target piece '{name}' gathers a non-constant or non-scalar index")
        first, shape_of = int(index), gather.input[0]
    else:
        what = "a graph input" if node is None else f"a {node.op_type}"
        raise _NoFold(f"target piece '{name}' is {what}, not a constant or a dimension of the input")
    shape = idx.producer_of(shape_of)
    if shape is None or shape.op_type != "Shape" or shape.domain not in ("", "ai.onnx"):
        raise _NoFold(f"target piece '{name}' takes dimensions of '{shape_of}', which is not a Shape output")
    if attr(shape, "start", 0) != 0 or attr(shape, "end", None) is not None:
        raise _NoFold(f"target piece '{name}' uses a Shape with start/end attributes")
    if shape.input[0] != data:
        raise _NoFold(f"target piece '{name}' is a dimension of '{shape.input[0]}', not of the reshaped '{data}'")
    if first != at:
        raise _NoFold(f"target piece '{name}' puts dimension {first} at position {at}: a 0 would copy dimension {at}")
    return [0]


__all__ = ["FoldShapes"]
