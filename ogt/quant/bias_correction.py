"""Bias correction: remove the mean output shift that weight quantization causes.

Quantizing a weight ``W`` to ``W_q`` changes a layer's output by ``(W_q - W) x``; averaged over
the data that is ``(W_q - W) E[x]``, a per-output-channel offset that rounding does not average
away (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, section 4.2, in its empirical form). With the per-input-channel means ``E[x_c]``
gathered during calibration, insert-qdq subtracts

- Conv (any ``group``):  ``delta[m] = sum_{c in group(m), k} (W_q - W)[m, c, k] * E[x_c]``
- Gemm:                  ``delta = (W_q - W)^T E[x]`` (``transB=0``) or ``(W_q - W) E[x]`` (``transB=1``)
- MatMul (+ bias Add):   ``delta = (W_q - W)^T E[x]`` over the last axis of ``x``

from the layer's bias (created for a Conv or Gemm that has none; a MatMul is corrected only when
its output feeds one Add with a constant bias). Only the weights ``insert`` will quantize are
looked at, with its bit width and per-channel setting. ``ogt quantize`` runs this before
calibrating activations, so the ranges are those of the corrected model. Padding is ignored (means are taken over every
position), which is exact for 1x1 convolutions and close for the others. Measured on MobileNetV2
(ort target): logit SQNR 18.4 -> 19.4 dB. On MiniLM-L3 correcting the MatMuls moved the embedding
cosine from 0.99796 to 0.99784 (the means include padded token positions), so ``ogt quantize``
corrects Conv and Gemm by default.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from ..graph.build import add_initializer, drop_unread_constants
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, attr
from ..transforms._base import Skip, Transform, TransformContext, TransformResult, counts_of, register
from .insert_qdq import InsertQDQ, quantize_weight
from .tokens import real_tokens, token_mask


class ChannelMean:
    """Streaming per-channel mean of a tensor along ``axis`` (every other axis averaged)."""

    wants_batch = True  # calibrate passes the batch: padded positions (attention mask 0) are left out

    def __init__(self, axis: int, token_weights: bool = True):
        self.axis = axis
        self.token_weights = token_weights
        self.total: np.ndarray | None = None
        self.count = 0

    def __call__(self, x: np.ndarray, batch=None) -> None:
        axis = self.axis % x.ndim
        if batch is not None and self.token_weights and axis >= 2:  # a channel axis after [batch, sequence]
            tokens = real_tokens(x, token_mask(batch))
            if tokens is not x:  # [real tokens, ...]: the channel axis moves up by one
                x, axis = tokens, axis - 1
        other = tuple(a for a in range(x.ndim) if a != axis)
        s = x.sum(axis=other, dtype=np.float64)  # accumulates in float64 without a float64 copy of x
        self.total = s if self.total is None else self.total + s
        self.count += x.size // max(x.shape[axis], 1)

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.total is None or not self.count else self.total / self.count


def input_channel_axis(op_type: str) -> int:
    """The axis of a weighted op's data input that its weight reduces over."""
    return -1 if op_type == "MatMul" else 1


def output_shift(op_type: str, dw: np.ndarray, mean: np.ndarray, *, group: int = 1, trans_b: int = 0) -> np.ndarray | None:
    """``(W_q - W) E[x]`` per output channel (see the module docstring); None when shapes do not fit."""
    mean = np.asarray(mean, np.float64)
    if op_type == "Conv":
        m, cpg = dw.shape[0], dw.shape[1]
        if mean.size != cpg * group or m % group:
            return None
        per = dw.reshape(m, cpg, -1).sum(axis=2).reshape(group, m // group, cpg)
        return np.einsum("gmc,gc->gm", per, mean.reshape(group, cpg)).reshape(m)
    if op_type == "Gemm" and dw.ndim == 2:
        w = dw if trans_b else dw.T  # [N, K]
        return w @ mean if w.shape[1] == mean.size else None
    if op_type == "MatMul" and dw.ndim == 2 and dw.shape[0] == mean.size:
        return dw.T @ mean
    return None


@register
@dataclasses.dataclass(frozen=True)
class CorrectBias(Transform):
    """Subtract each quantized layer's mean output shift from its bias (see the module docstring).

    ``means``: per-input-channel means of the weighted ops' data inputs (name -> 1-D array).
    ``insert``: the insert-qdq that will quantize the weights (its plan and bit width are used).
    ``ops``: the layer types corrected (``ogt quantize`` leaves MatMul out by default).
    """

    name: ClassVar[str] = "correct-bias"
    means: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    insert: InsertQDQ = dataclasses.field(default_factory=InsertQDQ)
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        idx = GraphIndex(model.graph)
        names = NameAllocator(model.graph)
        counts: Counter[str] = Counter()
        skipped: list[Skip] = []
        replaced: set[str] = set()
        for i, slot, axis in self.insert.plan(model).weights:
            node = idx.nodes[i]
            mean = self.means.get(node.input[0])
            if mean is None or node.op_type not in self.ops:
                continue
            w = model.array(idx.constant_storage(node.input[slot])).astype(np.float32)
            wq, scale = quantize_weight(w, axis, self.insert.weight_bits, self.insert.profile, self.insert.weight_method)
            shape = [-1 if a == axis else 1 for a in range(w.ndim)] if axis is not None else []
            dw = wq.astype(np.float64) * np.asarray(scale, np.float64).reshape(shape) - w
            delta = output_shift(node.op_type, dw, mean, group=int(attr(node, "group", 1)), trans_b=int(attr(node, "transB", 0)))
            if delta is None or not np.all(np.isfinite(delta)):
                skipped.append(Skip(node.name, node.op_type, "input channel means do not fit the weight"))
                continue
            if node.op_type == "Gemm":
                delta = delta * float(attr(node, "alpha", 1.0))
            reason = _subtract(model, idx, names, node, delta, replaced)
            if reason:
                skipped.append(Skip(node.name, node.op_type, reason))
            else:
                counts["corrected"] += 1
        drop_unread_constants(model.graph, replaced)  # the uncorrected biases
        return TransformResult(model, bool(counts), counts_of(self.name, counts), skipped)


def _subtract(model: Model, idx: GraphIndex, names: NameAllocator, node, delta: np.ndarray, replaced: set[str]) -> str | None:
    """Subtract ``delta`` from ``node``'s bias (a new initializer; created for Conv/Gemm without one)."""
    if node.op_type in ("Conv", "Gemm"):
        beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if beta == 0.0:
            return "Gemm with beta=0 has no bias to correct"
        if len(node.input) < 3 or not node.input[2]:
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = add_initializer(model.graph, names, f"{node.output[0]}_bias", (-delta / beta).astype(np.float32))
            return None
        target, slot, delta = node, 2, delta / beta
    elif node.op_type == "MatMul":
        users = idx.consumers.get(node.output[0], [])
        if len(users) != 1 or idx.nodes[users[0]].op_type != "Add" or node.output[0] in idx.graph_outputs:
            return "MatMul output does not feed exactly one bias Add"
        target = idx.nodes[users[0]]
        slot = 1 if target.input[0] == node.output[0] else 0
    else:
        return f"no bias correction for {node.op_type}"
    name = target.input[slot]
    storage = idx.constant_storage(name) if name else None
    if storage is None or len(idx.consumers.get(name, [])) != 1 or name in idx.graph_outputs:
        return f"bias '{name}' is not a constant read by this layer alone"
    b = model.array(storage).astype(np.float64)
    if b.size != delta.size:
        return f"bias '{name}' has {b.size} values for {delta.size} output channels"
    target.input[slot] = add_initializer(model.graph, names, f"{name}_corrected", (b - delta.reshape(b.shape)).astype(np.float32))
    replaced.add(name)
    return None


__all__ = ["ChannelMean", "CorrectBias", "input_channel_axis", "output_shift"]
