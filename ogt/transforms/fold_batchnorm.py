"""fold-batchnorm: fold inference-mode BatchNormalization into the preceding linear op.

With ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` a BatchNormalization is the
per-channel affine map ``y = s * x + t`` on axis 1, so for a producer ``x = W * a + b``:

- Conv            ``W'[m, ...] = W[m, ...] * s[m]``,                ``b' = b * s + t``
- ConvTranspose   ``W'[c, j, ...] = W[c, j, ...] * s[g * M/g + j]`` (c in group g), ``b' = b * s + t``
- Gemm            ``B' = B * s`` on the output axis (columns if transB=0, rows if transB=1),
                  ``C' = beta * C * s + t`` with ``beta' = 1`` (alpha is untouched)
- MatMul(+Add)    ``W'[:, m] = W[:, m] * s[m]``, bias ``b' = b * s + t`` (an Add is created when
                  there is none); only when the MatMul output is 2-D, where BN's axis 1 is the
                  MatMul's last axis
- anything else   ``y = x * s + t`` as one Mul and one Add (``s, t`` shaped ``[C, 1, ...]``)

Nothing is folded when the BN is in training mode or its parameters are not constants. A BN is
not folded into its producer (and is lowered to Mul+Add instead) when the producer's output is
also read elsewhere, or its weight or bias is shared with another node; ``skipped`` says which.
Arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx
from onnx import NodeProto, TensorProto

from ..graph.build import add_initializer, make_node, rebuild_nodes, set_attr, set_constant
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, TensorInfo, attr, describe, infer_types
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


class _Reject(Exception):
    """A reason a BN cannot be folded into its producer (caught, becomes a Skip)."""


@dataclasses.dataclass
class _Fold:
    """A planned fold: everything computed, nothing mutated yet."""

    bn: int
    producer: int
    kind: str
    new_weight: tuple[TensorProto, np.ndarray]
    new_bias: tuple[TensorProto | None, np.ndarray]
    bias_node: int | None = None  # the Add carrying a MatMul's bias


@dataclasses.dataclass
class _Lower:
    bn: int
    scale: np.ndarray
    shift: np.ndarray
    reason: str | None
    dtype: int = 0


@register
@dataclasses.dataclass(frozen=True)
class FoldBatchNorm(Transform):
    """Fold BatchNormalization into Conv / ConvTranspose / Gemm / MatMul(+Add) weights.

    lower_unfoldable: turn a BN with no foldable producer into one Mul + Add.
    """

    name: ClassVar[str] = "fold-batchnorm"
    lower_unfoldable: bool = True

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        counts: Counter[str] = Counter()
        while True:
            idx = GraphIndex(model.graph)
            types = infer_types(model)
            folds, lowers, skipped = self._plan(model, idx, types)
            if folds:
                counts.update(f.kind for f in folds)
                _mutate_folds(model, idx, folds)
                continue
            if self.lower_unfoldable and lowers:
                _mutate_lowers(model, idx, lowers)
                counts["mul-add"] += len(lowers)
            skipped += [Skip(idx.nodes[lw.bn].name, "BatchNormalization", lw.reason) for lw in lowers if lw.reason]
            if not self.lower_unfoldable:
                skipped += [
                    Skip(idx.nodes[lw.bn].name, "BatchNormalization", "no foldable producer (lowering disabled)")
                    for lw in lowers
                    if not lw.reason
                ]
            break
        return TransformResult(model, bool(counts), counts_of(self.name, counts), skipped)

    def _plan(self, model: Model, idx: GraphIndex, types: dict[str, TensorInfo]):
        folds: list[_Fold] = []
        lowers: list[_Lower] = []
        skipped: list[Skip] = []
        for i, node in enumerate(idx.nodes):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            try:
                scale, shift = _affine(model, idx, node)
            except _Reject as r:
                skipped.append(Skip(node.name, node.op_type, str(r)))
                continue
            try:
                folds.append(_plan_fold(model, idx, types, i, scale, shift))
                continue
            except _Reject as r:
                reason = str(r) or None
            info = types.get(node.input[0], TensorInfo(0, None))
            rank = info.rank
            if rank is None or rank < 2:
                skipped.append(Skip(node.name, node.op_type, f"rank of input '{node.input[0]}' is unknown; cannot lower to Mul+Add"))
                continue
            shape = (scale.size,) + (1,) * (rank - 2)
            lowers.append(_Lower(i, scale.reshape(shape), shift.reshape(shape), reason, info.elem_type))
        return folds, lowers, skipped


def _affine(model: Model, idx: GraphIndex, bn: NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with ``BN(x) = s * x + t``, or _Reject."""
    if attr(bn, "training_mode", 0):
        raise _Reject("training_mode=1: the node computes batch statistics, it is not an affine map")
    if any(o for o in bn.output[1:]):
        raise _Reject("has running-mean/variance outputs (training mode); not an inference BatchNormalization")
    if len(bn.input) != 5:
        raise _Reject(f"expected 5 inputs, found {len(bn.input)}")
    params = []
    for role, name in zip(("scale", "bias", "mean", "var"), bn.input[1:]):
        t = idx.constant_tensor(name)
        if t is None:
            raise _Reject(f"{role}: {idx.why_not_constant(name)}")
        if t.data_type not in _FLOAT_TYPES:
            raise _Reject(f"{role} '{name}' is not floating point")
        params.append(model.array(t).astype(np.float64).reshape(-1))
    gamma, beta, mean, var = params
    if not len(gamma) == len(beta) == len(mean) == len(var):
        raise _Reject("scale, bias, mean and var have different lengths")
    eps = float(attr(bn, "epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _plan_fold(model, idx: GraphIndex, types, i: int, s: np.ndarray, t: np.ndarray) -> _Fold:
    bn = idx.nodes[i]
    x = bn.input[0]
    p = idx.producer.get(x)
    if p is None:
        raise _Reject("")
    prod = idx.nodes[p]
    kind = prod.op_type if prod.domain in ("", "ai.onnx") else ""
    if kind == "Add":
        return _plan_matmul_add(model, idx, types, i, p, s, t)
    if kind not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        raise _Reject("")
    _require_sole_reader(idx, x, i, prod)
    wname = prod.input[1]
    w_t, w = _exclusive_constant(model, idx, wname, p, "weight")
    b_t, b = (None, None)
    if len(prod.input) > 2 and prod.input[2]:
        b_t, b = _exclusive_constant(model, idx, prod.input[2], p, "bias")
    if kind == "Conv":
        new_w, out_ch = _scale_axis(w, s, 0), w.shape[0]
    elif kind == "ConvTranspose":
        new_w, out_ch = _scale_conv_transpose(w, s, int(attr(prod, "group", 1)))
    elif kind == "Gemm":
        return _plan_gemm(model, idx, i, p, w_t, w, s, t)
    else:
        rank = types.get(x, TensorInfo(0, None)).rank
        if w.ndim != 2 or rank != 2 or idx.is_constant(prod.input[0]):
            raise _Reject(
                f"MatMul '{prod.name}' output has rank {rank}; BatchNormalization normalises axis 1, "
                "which is the MatMul's last axis only for 2-D outputs with a 2-D constant weight"
            )
        new_w, out_ch = _scale_axis(w, s, 1), w.shape[1]
        kind = "matmul"
    if out_ch != s.size:
        raise _Reject(f"{prod.op_type} '{prod.name}' has {out_ch} output channels but the BN has {s.size}")
    bias = t if b is None else b.astype(np.float64) * s + t
    return _Fold(i, p, kind.lower(), (w_t, new_w.astype(w.dtype)), (b_t, bias.astype(w.dtype)))


def _plan_gemm(model, idx, i, p, w_t, w, s, t) -> _Fold:
    gemm = idx.nodes[p]
    trans_b = int(attr(gemm, "transB", 0))
    if w.ndim != 2:
        raise _Reject(f"Gemm '{gemm.name}' weight is not 2-D")
    axis = 0 if trans_b else 1
    if w.shape[axis] != s.size:
        raise _Reject(f"Gemm '{gemm.name}' has {w.shape[axis]} output features but the BN has {s.size}")
    beta = float(attr(gemm, "beta", 1.0))
    c = np.zeros(s.size)
    c_t = None
    if len(gemm.input) > 2 and gemm.input[2]:
        c_t, c_arr = _exclusive_constant(model, idx, gemm.input[2], p, "bias C")
        c = c_arr.astype(np.float64) * beta
    bias = c * s + t
    if bias.ndim > 2:
        raise _Reject(f"Gemm '{gemm.name}' bias C has rank {bias.ndim}")
    return _Fold(i, p, "gemm", (w_t, _scale_axis(w, s, axis).astype(w.dtype)), (c_t, bias.astype(w.dtype)))


def _plan_matmul_add(model, idx, types, i, p, s, t) -> _Fold:
    add = idx.nodes[p]
    bn = idx.nodes[i]
    _require_sole_reader(idx, bn.input[0], i, add)
    mm_i = next((idx.producer.get(n) for n in add.input if idx.producer.get(n) is not None
                 and idx.nodes[idx.producer[n]].op_type == "MatMul"), None)
    if mm_i is None:
        raise _Reject("")
    mm = idx.nodes[mm_i]
    bias_name = next((n for n in add.input if n != mm.output[0]), None)
    if bias_name is None or not idx.is_constant(bias_name):
        raise _Reject(f"Add '{add.name}' after MatMul '{mm.name}' does not add a constant bias")
    _require_sole_reader(idx, mm.output[0], p, mm)
    w_t, w = _exclusive_constant(model, idx, mm.input[1], mm_i, "weight")
    b_t, b = _exclusive_constant(model, idx, bias_name, p, "bias")
    rank = types.get(mm.output[0], TensorInfo(0, None)).rank
    if w.ndim != 2 or rank != 2 or w.shape[1] != s.size:
        raise _Reject(
            f"MatMul '{mm.name}' output has rank {rank} and weight shape {list(w.shape)}; "
            "BatchNormalization's axis 1 must be the MatMul's last axis"
        )
    new_b = b.astype(np.float64) * s + t
    return _Fold(i, mm_i, "matmul-add", (w_t, _scale_axis(w, s, 1).astype(w.dtype)), (b_t, new_b.astype(b.dtype)), bias_node=p)


def _require_sole_reader(idx: GraphIndex, name: str, reader: int, prod: NodeProto) -> None:
    others = idx.other_users(name, reader)
    if others:
        raise _Reject(f"output '{name}' of {describe(prod)} is also read by {', '.join(others)}")


def _exclusive_constant(model: Model, idx: GraphIndex, name: str, user: int, role: str):
    t = idx.constant_storage(name)
    if t is None:
        raise _Reject(f"{role} of {describe(idx.nodes[user])}: {idx.why_not_constant(name)}")
    if t.data_type not in _FLOAT_TYPES:
        raise _Reject(f"{role} '{name}' of {describe(idx.nodes[user])} is not floating point")
    others = idx.other_users(name, user)
    if others:
        raise _Reject(f"{role} '{name}' of {describe(idx.nodes[user])} is shared with {', '.join(others)}")
    return t, model.array(t)


def _scale_axis(w: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = s.size
    return w.astype(np.float64) * s.reshape(shape)


def _scale_conv_transpose(w: np.ndarray, s: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    c_in, m_per_group = w.shape[0], w.shape[1]
    out_ch = m_per_group * group
    if out_ch != s.size or c_in % group:
        return w, out_ch
    wg = w.astype(np.float64).reshape((group, c_in // group, m_per_group) + w.shape[2:])
    sg = s.reshape((group, 1, m_per_group) + (1,) * (w.ndim - 2))
    return (wg * sg).reshape(w.shape), out_ch


def _mutate_folds(model: Model, idx: GraphIndex, folds: list[_Fold]) -> None:
    g = model.graph
    names = NameAllocator(g)
    replacements: dict[int, list[NodeProto]] = {}
    while folds:  # pop as we go: each planned array is freed once written into the proto
        f = folds.pop()
        bn = idx.nodes[f.bn]
        prod = idx.nodes[f.producer]
        w_t, w = f.new_weight
        _rewrite_constant(idx, names, w_t, w, prod, 1)
        del w, f.new_weight
        b_t, b = f.new_bias
        if b_t is not None:
            bias_user = idx.nodes[f.bias_node] if f.kind == "matmul-add" else prod
            _rewrite_constant(idx, names, b_t, b, bias_user, _input_slot(bias_user, b_t, idx))
        if f.kind == "gemm":
            set_attr(prod, "beta", 1.0)
        last = prod
        if f.kind == "matmul-add":
            last = idx.nodes[f.bias_node]
        elif b_t is None and f.kind == "matmul":
            bias = add_initializer(g, names, f"{prod.name or 'matmul'}.bias", b)
            add = make_node("Add", [prod.output[0], bias], [bn.output[0]], names, f"{prod.name or 'matmul'}.bn_add")
            replacements[f.bn] = [add]
            continue
        elif b_t is None:
            bias = add_initializer(g, names, f"{prod.name or prod.op_type.lower()}.bias", b)
            if len(prod.input) == 2:
                prod.input.append(bias)
            else:
                prod.input[2] = bias
        last.output[0] = bn.output[0]
        replacements[f.bn] = []
    rebuild_nodes(g, replacements)


def _rewrite_constant(idx: GraphIndex, names: NameAllocator, t: TensorProto, value: np.ndarray, user: NodeProto, slot: int) -> None:
    """New values get a new name (names are identities); storage is reused in place."""
    old = user.input[slot]
    new = names.new(old)
    set_constant(t, value)
    i = idx.producer.get(old)
    if i is not None and idx.nodes[i].op_type == "Constant":
        idx.nodes[i].output[0] = new
    else:
        t.name = new
    user.input[slot] = new


def _input_slot(user: NodeProto, t: TensorProto, idx: GraphIndex) -> int:
    for k, name in enumerate(user.input):
        if idx.constant_storage(name) is t:
            return k
    raise AssertionError(f"constant '{t.name}' is not an input of {describe(user)}")


def _mutate_lowers(model: Model, idx: GraphIndex, lowers: list[_Lower]) -> None:
    g = model.graph
    names = NameAllocator(g)
    replacements: dict[int, list[NodeProto]] = {}
    for lw in lowers:
        bn = idx.nodes[lw.bn]
        dtype = _np_float(idx, model, bn, lw.dtype)
        base = bn.name or "bn"
        s = add_initializer(g, names, f"{base}.scale", lw.scale.astype(dtype))
        t = add_initializer(g, names, f"{base}.shift", lw.shift.astype(dtype))
        mid = names.new(f"{base}.scaled")
        replacements[lw.bn] = [
            make_node("Mul", [bn.input[0], s], [mid], names, f"{base}.mul"),
            make_node("Add", [mid, t], [bn.output[0]], names, f"{base}.add"),
        ]
    rebuild_nodes(g, replacements)


def _np_float(idx: GraphIndex, model: Model, bn: NodeProto, elem_type: int) -> np.dtype:
    if elem_type in _FLOAT_TYPES and elem_type != TensorProto.BFLOAT16:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    t = idx.constant_tensor(bn.input[1])
    return model.array(t).dtype if t is not None else np.dtype(np.float32)
