"""Lint any QDQ model (ogt's or another tool's) against TensorRT's explicit-quantization rules.

Rules (TensorRT developer guide, "Explicit Quantization" / Q/DQ placement):

- ``zero-point``: every Q/DQ zero point is 0 (TensorRT supports symmetric quantization only).
- ``dtype``: Q/DQ carry int8 (or int4 / fp8 weights); uint8 is not supported.
- ``int32``: no int32-quantized tensors (bias quantized to int32 is an onnxruntime idiom).
- ``dynamic``: no DynamicQuantizeLinear (TensorRT needs static scales).
- ``weight-axis``: per-channel weight scales lie on the output-channel axis of the consuming op
  (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul last axis).
- ``activation-per-tensor``: activation Q/DQ scales are per tensor.
- ``residual-add``: an Add of two activations has Q/DQ on both inputs or on neither.
- ``concat-scale``: the quantized inputs of a Concat share one scale and zero point.
- ``no-fusion``: a DequantizeLinear feeding an op TensorRT runs only in float (Softmax,
  LayerNormalization, Sigmoid, ...): TensorRT cannot fuse that Q/DQ.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import NodeProto, TensorProto

from ..graph.model import Model
from ..graph.query import GraphIndex, attr, describe
from ..quant.profiles import TENSORRT, weight_axis

_ALLOWED_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def lint_tensorrt(model: Model) -> list[Violation]:
    idx = GraphIndex(model.graph)
    out: list[Violation] = []
    for i, node in enumerate(idx.nodes):
        op = node.op_type
        if op == "DynamicQuantizeLinear":
            out.append(Violation("dynamic", _name(node), "DynamicQuantizeLinear: TensorRT needs static scales"))
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            out += _check_qdq(model, idx, i, node)
        elif op == "Add":
            out += _check_residual(idx, node)
        elif op == "Concat":
            out += _check_concat(model, idx, node)
    return out


def _name(node: NodeProto) -> str:
    return node.name or node.output[0]


def _const(model: Model, idx: GraphIndex, name: str) -> np.ndarray | None:
    t = idx.constant_tensor(name) if name else None
    return None if t is None else model.array(t)


def _check_qdq(model: Model, idx: GraphIndex, i: int, node: NodeProto) -> list[Violation]:
    out: list[Violation] = []
    zp = _const(model, idx, node.input[2]) if len(node.input) > 2 else None
    if zp is not None and np.any(zp != 0):
        out.append(Violation("zero-point", _name(node), f"zero point {np.unique(zp)[:4].tolist()} is not 0 (TensorRT is symmetric)"))
    qtype = _quantized_type(idx, node, zp)
    if qtype == TensorProto.INT32:
        out.append(Violation("int32", _name(node), "int32-quantized tensor (bias); TensorRT keeps biases float"))
    elif qtype is not None and qtype not in _ALLOWED_TYPES:
        out.append(Violation("dtype", _name(node), f"quantized type {TensorProto.DataType.Name(qtype)}; TensorRT needs int8"))
    if node.op_type == "DequantizeLinear":
        out += _check_dq_consumers(model, idx, node)
    return out


def _quantized_type(idx: GraphIndex, node: NodeProto, zp) -> int | None:
    if len(node.input) > 2 and node.input[2]:
        t = idx.constant_tensor(node.input[2])
        if t is not None:
            return t.data_type
    if node.op_type == "DequantizeLinear":
        t = idx.constant_tensor(node.input[0])
        if t is not None:
            return t.data_type
    return TensorProto.UINT8 if node.op_type == "QuantizeLinear" and len(node.input) < 3 else None


def _check_dq_consumers(model: Model, idx: GraphIndex, dq: NodeProto) -> list[Violation]:
    out: list[Violation] = []
    scale = _const(model, idx, dq.input[1])
    per_channel = scale is not None and scale.size > 1
    is_weight = idx.is_constant(dq.input[0])
    for c in idx.consumers.get(dq.output[0], ()):
        user = idx.nodes[c]
        if user.op_type in TENSORRT.float_only_ops:
            out.append(Violation("no-fusion", _name(dq), f"feeds {describe(user)}, which TensorRT runs in float"))
        if not per_channel:
            continue
        slot = list(user.input).index(dq.output[0])
        if is_weight and slot == 1 and user.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            w = idx.constant_tensor(dq.input[0])
            want = weight_axis(user.op_type, int(attr(user, "transB", 0)), len(w.dims), int(attr(user, "group", 1)))
            got = int(attr(dq, "axis", 1))
            got = got + len(w.dims) if got < 0 else got
            if want != got:
                out.append(Violation("weight-axis", _name(dq), f"per-channel axis {got}, but {describe(user)} needs axis {want}"))
        elif not is_weight:
            out.append(Violation("activation-per-tensor", _name(dq), f"per-channel activation scales feeding {describe(user)}"))
    return out


def _dq_input(idx: GraphIndex, name: str) -> NodeProto | None:
    p = idx.producer_of(name)
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _check_residual(idx: GraphIndex, add: NodeProto) -> list[Violation]:
    acts = [n for n in add.input if n and not idx.is_constant(n) and not _is_weight_dq(idx, n)]
    if len(acts) != 2:
        return []
    quantized = [_dq_input(idx, n) is not None for n in acts]
    if any(quantized) and not all(quantized):
        plain = acts[quantized.index(False)]
        return [Violation("residual-add", _name(add), f"input '{plain}' has no Q/DQ while the other input does")]
    return []


def _is_weight_dq(idx: GraphIndex, name: str) -> bool:
    dq = _dq_input(idx, name)
    return dq is not None and idx.is_constant(dq.input[0])


def _check_concat(model: Model, idx: GraphIndex, concat: NodeProto) -> list[Violation]:
    dqs = [_dq_input(idx, n) for n in concat.input if n]
    if not any(dqs):
        return []
    if not all(dqs):
        return [Violation("concat-scale", _name(concat), "some inputs are quantized and some are not")]
    params = set()
    for dq in dqs:
        s = _const(model, idx, dq.input[1])
        z = _const(model, idx, dq.input[2]) if len(dq.input) > 2 else np.zeros(1)
        params.add((None if s is None else tuple(np.ravel(s).tolist()), None if z is None else tuple(np.ravel(z).tolist())))
    if len(params) > 1:
        return [Violation("concat-scale", _name(concat), f"inputs use {len(params)} different scales/zero points; TensorRT needs one")]
    return []
