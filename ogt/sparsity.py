"""Per-weight N:M sparsity report (``ogt inspect``): is each weight N:M sparse, and can sparse kernels use it.

For every Conv, Gemm and MatMul with a constant weight -- read through a ``DequantizeLinear``
of a constant, so quantized models are checked on their integer weights -- and every packed
``ai.ogt::Sparse24MatMul``: reduction size (K, input channels per group), output channels, the
fraction of zeros, the fraction of groups of ``m`` with at most ``n`` non-zeros, and whether the
layer is eligible for sparse kernels with the reason. "Eligible" is ogt's reading: a 2:4 pattern
along the reduction axis in a dense group=1 Conv or a Gemm (TensorRT's sparse tactics, chosen by
TensorRT only where they are faster) or a MatMul/Gemm that pack-nm can pack. Not checked against
a real TensorRT.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .graph.model import Model
from .graph.query import GraphIndex
from .kernels import sparse24
from .transforms import _nm
from .transforms.prune_nm import WEIGHTED, Reject, weight_layout


@dataclasses.dataclass(frozen=True)
class WeightSparsity:
    node: str
    op_type: str
    weight: str
    reduction: int | None
    outputs: int | None
    zero_fraction: float | None
    nm_fraction: float | None  # groups with at most n non-zeros
    sparse: bool
    eligible: bool
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sparsity_report(model: Model, n: int = 2, m: int = 4) -> list[WeightSparsity]:
    idx = GraphIndex(model.graph)
    out = []
    for node in idx.nodes:
        if node.domain == sparse24.DOMAIN and node.op_type == sparse24.OP_TYPE:
            out.append(_packed(idx, node))
        elif node.domain in ("", "ai.onnx") and node.op_type in WEIGHTED and len(node.input) > 1:
            t, via = _weight(idx, node.input[1])
            if t is None:
                if node.op_type != "MatMul":
                    out.append(WeightSparsity(node.name, node.op_type, node.input[1], None, None, None, None, False, False,
                                              "weight is not a constant"))
                continue
            out.append(_dense(model, node, t, via, n, m))
    return out


def _weight(idx: GraphIndex, name: str):
    t = idx.constant_tensor(name)
    if t is not None:
        return t, ""
    prod = idx.producer_of(name)
    if prod is not None and prod.op_type == "DequantizeLinear" and idx.is_constant(prod.input[0]):
        return idx.constant_tensor(prod.input[0]), " (quantized)"
    return None, ""


def _dense(model: Model, node, t, via: str, n: int, m: int) -> WeightSparsity:
    shape = tuple(int(d) for d in t.dims)
    try:
        layout, _ = weight_layout(node, shape, m)
    except Reject as r:
        return WeightSparsity(node.name, node.op_type, node.input[1], None, None, None, None, False, False, str(r))
    rows = _nm.to_rows(model.array(t), layout)
    zero = float(np.mean(rows == 0)) if rows.size else 0.0
    frac = _nm.compliant_fraction(rows, n, m)
    sparse = frac == 1.0
    k, outs = layout.reduction, layout.outputs
    what = f"{n}:{m}"
    if not sparse:
        reason = f"not {what} sparse{via}: {frac:.0%} of groups of {m} along K={k} comply (prune-nm makes it so)"
        return WeightSparsity(node.name, node.op_type, node.input[1], k, outs, zero, frac, False, False, reason)
    eligible, reason = True, f"{what} sparse{via} along K={k}, {outs} outputs"
    if node.op_type == "Conv" and layout.group > 1:
        eligible, reason = False, f"{reason}, but grouped convolution (group={layout.group}): ogt counts only group=1 as eligible"
    elif node.op_type == "Conv":
        reason += ": TensorRT sparse convolution tactics apply"
    elif node.op_type == "MatMul":
        reason += ": pack-nm can pack it; for TensorRT rewrite it to Gemm (prune-nm --target tensorrt)"
    else:
        reason += ": TensorRT sparse tactics apply; pack-nm can pack it"
    if (n, m) != (2, 4):
        eligible, reason = False, f"{what} sparse along K={k}: NVIDIA's sparse kernels need 2:4"
    return WeightSparsity(node.name, node.op_type, node.input[1], k, outs, zero, frac, True, eligible, reason)


def _packed(idx: GraphIndex, node) -> WeightSparsity:
    values = idx.constant_tensor(node.input[1])
    n_out, k = (int(values.dims[0]), int(values.dims[1]) * 2) if values is not None and len(values.dims) == 2 else (None, None)
    return WeightSparsity(node.name, node.op_type, node.input[1], k, n_out, None, 1.0, True, True,
                          "packed 2:4 (kept values + 2-bit positions): runs on ai.ogt::Sparse24MatMul kernels")


def format_sparsity(report: list[WeightSparsity], detail: bool = False) -> list[str]:
    """Lines for ``ogt inspect``: a summary, and with ``detail`` one line per weight."""
    if not report:
        return ["N:M sparsity        no Conv/Gemm/MatMul weights"]
    sparse = sum(r.sparse for r in report)
    eligible = sum(r.eligible for r in report)
    lines = [f"N:M sparsity        {sparse}/{len(report)} weights 2:4 sparse, {eligible} eligible for sparse kernels"]
    if not detail:
        reasons: dict[str, int] = {}
        for r in report:
            if not r.eligible:
                key = re.sub(r"(?<![:\d])\d+(?![:\d])", "N", r.reason.split(": ")[0])
                reasons[key] = reasons.get(key, 0) + 1
        lines += [f"  {count:>4} x {key}" for key, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
        if report:
            lines.append("  (ogt inspect --sparsity lists every weight)")
        return lines
    for r in report:
        flag = "yes" if r.eligible else "no "
        lines.append(f"  {flag} {r.op_type:<15} {r.node or r.weight}: {r.reason}")
    return lines
