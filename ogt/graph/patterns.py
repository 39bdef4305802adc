"""Subgraph patterns shared by analyses (``ogt inspect``) and transforms: one matcher per pattern.

LayerNorm comes in two shapes:

- the ``LayerNormalization`` op (opset 17+): ``y = scale * (x - mean) / sqrt(var + eps) + B``
  over the axes ``[axis, rank)``;
- written out, as exporters emit it for older opsets or hand-written modules::

      mean = ReduceMean(x)                    axes as attribute (opset < 18) or constant input
      d    = Sub(x, mean)
      sq   = Pow(d, 2) | Mul(d, d)
      var  = ReduceMean(sq)                   the same axes, keepdims
      ve   = Add(var, eps) | Add(eps, var)    eps an initializer or a Constant node
      std  = Sqrt(ve)
      n    = Div(d, std) | Mul(d, Reciprocal(std)) | Mul(Reciprocal(std), d)
      s    = Mul(n, gamma) | Mul(gamma, n)    optional: the tail
      y    = Add(s, beta)  | Add(beta, s)     optional: the tail

  The tail only extends through a tensor read by exactly one node (so rewriting gamma or beta
  changes no other reader), and only over constants whose non-trailing dims are all 1 (they act
  on the normalised axis alone).

:func:`layernorms` finds both; :func:`decomposed_layernorms` the written-out ones only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
from onnx import NodeProto, TensorProto, numpy_helper

from .query import GraphIndex, attr

Reader = Callable[[TensorProto], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LayerNormMatch:
    """One LayerNorm in a graph. Node positions index ``GraphIndex.nodes``.

    kind: ``"op"`` or ``"decomposed"``.
    x / output: the tensor normalised and the LayerNorm's final output (after gamma and beta).
    axes: the op's ``(axis,)`` (normalises ``[axis, rank)``) or the ReduceMean axes as written.
    normalized: decomposed only, ``(x - mean) / sqrt(var + eps)`` before gamma and beta.
    gamma / beta: names of the constant scale and shift (None when absent: 1 and 0).
    gamma_node / beta_node: decomposed only, the tail Mul and Add (None when absent).
    anchor: the op, or the decomposed node that produces ``normalized``.
    nodes: every node of the pattern, tail included.
    """

    kind: str
    x: str
    output: str
    axes: tuple[int, ...]
    epsilon: float | None
    anchor: int
    nodes: tuple[int, ...]
    normalized: str | None = None
    gamma: str | None = None
    beta: str | None = None
    gamma_node: int | None = None
    beta_node: int | None = None

    def over_last_axis(self, rank: int | None) -> bool:
        """True when only the last axis is normalised (rank needed for non-negative axes)."""
        if len(self.axes) != 1:
            return False
        a = self.axes[0]
        return a == -1 or (rank is not None and a == rank - 1)


def default_reader(t: TensorProto) -> np.ndarray | None:
    """Values of an in-memory tensor; None for external data (pass a model-aware reader for those)."""
    if t.data_location == TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(t)


def layernorms(idx: GraphIndex, read: Reader = default_reader) -> list[LayerNormMatch]:
    """Every LayerNorm of the top-level graph: ops first (in node order), then decomposed."""
    found = [_op_match(idx, i) for i, n in enumerate(idx.nodes) if _is(n, "LayerNormalization")]
    return found + decomposed_layernorms(idx, read)


def decomposed_layernorms(idx: GraphIndex, read: Reader = default_reader) -> list[LayerNormMatch]:
    out = []
    for i, sub in enumerate(idx.nodes):
        if _is(sub, "Sub") and len(sub.input) == 2:
            m = _decomposed_at(idx, i, read)
            if m is not None:
                out.append(m)
    return out


def _is(node: NodeProto, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


def _op_match(idx: GraphIndex, i: int) -> LayerNormMatch:
    node = idx.nodes[i]
    beta = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return LayerNormMatch(
        kind="op",
        x=node.input[0],
        output=node.output[0],
        axes=(int(attr(node, "axis", -1)),),
        epsilon=float(attr(node, "epsilon", 1e-5)),
        anchor=i,
        nodes=(i,),
        gamma=node.input[1],
        beta=beta,
    )


def _readers(idx: GraphIndex, name: str, op: str | None = None) -> Iterator[tuple[int, NodeProto]]:
    for i in idx.consumers.get(name, ()):
        node = idx.nodes[i]
        if op is None or _is(node, op):
            yield i, node


def _value(idx: GraphIndex, name: str, read: Reader) -> np.ndarray | None:
    t = idx.constant_tensor(name)
    return None if t is None else read(t)


def _axes(idx: GraphIndex, node: NodeProto, read: Reader) -> tuple[int, ...] | None:
    """ReduceMean axes (attribute or constant input), None if unknown or keepdims=0."""
    if not int(attr(node, "keepdims", 1)):
        return None
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = _value(idx, node.input[1], read)
        axes = None if v is None else v.reshape(-1).tolist()
    return None if not axes else tuple(int(a) for a in axes)


def _scalar(idx: GraphIndex, name: str, read: Reader) -> float | None:
    v = _value(idx, name, read)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _decomposed_at(idx: GraphIndex, sub_i: int, read: Reader) -> LayerNormMatch | None:
    sub = idx.nodes[sub_i]
    x, d = sub.input[0], sub.output[0]
    mean_i = idx.producer.get(sub.input[1])
    if mean_i is None or not _is(idx.nodes[mean_i], "ReduceMean") or idx.nodes[mean_i].input[0] != x:
        return None
    axes = _axes(idx, idx.nodes[mean_i], read)
    if axes is None:
        return None
    for sq_i, sq in _readers(idx, d):
        squares = (_is(sq, "Pow") and sq.input[0] == d and _scalar(idx, sq.input[1], read) == 2.0) or (
            _is(sq, "Mul") and sq.input[0] == sq.input[1] == d
        )
        if not squares:
            continue
        for var_i, var in _readers(idx, sq.output[0], "ReduceMean"):
            if _axes(idx, var, read) != axes:
                continue
            for add_i, add in _readers(idx, var.output[0], "Add"):
                eps_name = add.input[1] if add.input[0] == var.output[0] else add.input[0]
                eps = _scalar(idx, eps_name, read)
                if eps is None:
                    continue
                for sqrt_i, sqrt in _readers(idx, add.output[0], "Sqrt"):
                    norm = _normalization(idx, d, sqrt.output[0])
                    if norm is None:
                        continue
                    core = (mean_i, sub_i, sq_i, var_i, add_i, sqrt_i, *norm)
                    return _with_tail(idx, x, axes, eps, core, norm[-1])
    return None


def _normalization(idx: GraphIndex, d: str, std: str) -> tuple[int, ...] | None:
    """(Div,) or (Reciprocal, Mul) computing ``d / std``."""
    for i, node in _readers(idx, std):
        if _is(node, "Div") and node.input[0] == d and node.input[1] == std:
            return (i,)
        if _is(node, "Reciprocal"):
            for j, mul in _readers(idx, node.output[0], "Mul"):
                if sorted(mul.input) == sorted([d, node.output[0]]):
                    return (i, j)
    return None


def _with_tail(idx: GraphIndex, x: str, axes, eps: float, core: tuple[int, ...], anchor: int) -> LayerNormMatch:
    normalized = idx.nodes[anchor].output[0]
    out, nodes = normalized, list(core)
    gamma = beta = gamma_node = beta_node = None
    step = _tail_step(idx, out, "Mul")
    if step is not None:
        gamma_node, gamma = step
        out = idx.nodes[gamma_node].output[0]
        nodes.append(gamma_node)
    step = _tail_step(idx, out, "Add")
    if step is not None:
        beta_node, beta = step
        out = idx.nodes[beta_node].output[0]
        nodes.append(beta_node)
    return LayerNormMatch(
        kind="decomposed",
        x=x,
        output=out,
        axes=axes,
        epsilon=eps,
        anchor=anchor,
        nodes=tuple(nodes),
        normalized=normalized,
        gamma=gamma,
        beta=beta,
        gamma_node=gamma_node,
        beta_node=beta_node,
    )


def _tail_step(idx: GraphIndex, name: str, op: str) -> tuple[int, str] | None:
    """The sole reader of ``name`` if it is ``op`` with a per-channel constant: (node, constant)."""
    if name in idx.graph_outputs or len(idx.consumers.get(name, ())) != 1:
        return None
    i = idx.consumers[name][0]
    node = idx.nodes[i]
    if not _is(node, op) or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    other = node.input[1] if node.input[0] == name else node.input[0]
    t = idx.constant_tensor(other)
    if t is None or any(d != 1 for d in list(t.dims)[:-1]):
        return None
    return i, other
