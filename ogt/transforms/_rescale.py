"""Per-channel rescaling of a tensor's last axis, moved into its readers (migrate-gamma, smoothquant).

With ``h`` of shape ``(..., H)`` and a vector ``m`` of ``H`` non-zero factors, write
``h = m * h'``. Two ways to produce ``h'``:

- **fold into a LayerNorm** producing ``h``: ``gamma' = gamma / m``, ``beta' = beta / m``
  (:class:`LayerNormPlan`), so the LayerNorm itself outputs ``h'``;
- **insert** ``h' = Mul(h, 1 / m)`` in front of the linear readers (:class:`InsertPlan`).

Readers of ``h`` (:func:`classify_readers`):

- *linear layers* absorb ``m`` and read ``h'``: ``MatMul(h, W) = MatMul(h', W')`` with
  ``W'[..., k, :] = m[k] W[..., k, :]``; ``Gemm(h, B)`` (transA=0) with ``B'[k, :] = m[k] B[k, :]``
  (transB=0) or ``B'[:, k] = m[k] B[:, k]`` (transB=1). A weight read by anything else is not
  touched: the layer gets a rescaled copy under a fresh name (counted as ``shared-weight-copied``).
- ``Mul(h, c)`` with ``c`` constant reads ``h'`` with ``c' = c * m``;
- ``Shape`` and ``Size`` read ``h'`` (same shape);
- other readers *linear in h* (Add, Sub, Mul by a tensor, Div of ``h``, Concat, Reshape,
  Transpose, Gather, Slice, ReduceSum/Mean, ..., a MatMul or Gemm whose weight is not constant
  or that is excluded) and a graph output keep reading ``h``, now computed by one inserted
  ``Mul(h', m)`` (the residual branch of a post-LN block);
- anything else (Relu, Gelu, Softmax, Erf, another LayerNorm, ``Mul(h, h)``...) is not linear in
  ``h``: the block is skipped with that reader named.

``h'`` is a new tensor with a fresh name; the restored ``h`` keeps its name (names are
identities: the value is unchanged). Arithmetic in float64, cast back to each constant's dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import NodeProto, TensorProto

from ..graph.build import add_initializer, drop_unread_constants, make_node, rebuild_nodes
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.patterns import LayerNormMatch
from ..graph.query import GraphIndex, attr, describe

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}

#: op -> input slots in which the op is linear (None: every slot).
LINEAR_IN: dict[str, tuple[int, ...] | None] = {
    "Add": None, "Sub": None, "Mul": None, "Div": (0,), "Neg": (0,), "MatMul": None, "Gemm": (0, 1),
    "Identity": (0,), "Reshape": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Flatten": (0,), "Concat": None, "Split": (0,), "Slice": (0,), "Gather": (0,), "Expand": (0,),
    "Tile": (0,), "ReduceSum": (0,), "ReduceMean": (0,), "Where": (1, 2), "Einsum": None,
}
SHAPE_ONLY = ("Shape", "Size")


class Reject(Exception):
    """Why a tensor's readers cannot take a rescaling (becomes a Skip)."""


def is_std(node: NodeProto, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


def glob_excluder(patterns: Sequence[str]) -> Callable[[NodeProto], bool]:
    """Match a node by name or op type against shell globs."""
    pats = tuple(patterns)
    return lambda n: any(fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(n.op_type, p) for p in pats)


@dataclasses.dataclass(frozen=True)
class LinearReader:
    node: int
    weight: str
    k_axis: int  # the weight axis that meets h's last axis


@dataclasses.dataclass
class Readers:
    linear: list[LinearReader]
    fold_mul: list[int]  # Mul(h, constant): m goes into the constant
    shape: list[int]
    keep: list[int]  # read the restored h
    output: bool  # h is a graph output

    @property
    def restore(self) -> bool:
        return bool(self.keep) or self.output


def linear_reader(idx: GraphIndex, i: int, h: str) -> LinearReader | None:
    """``i`` as a linear layer reading ``h`` with a constant float weight, or None."""
    node = idx.nodes[i]
    if is_std(node, "MatMul") and node.input[0] == h and node.input[1] != h:
        t = idx.constant_tensor(node.input[1])
        if t is not None and t.data_type in FLOAT_TYPES and len(t.dims) >= 2:
            return LinearReader(i, node.input[1], len(t.dims) - 2)
    if is_std(node, "Gemm") and node.input[0] == h and h not in node.input[1:] and not attr(node, "transA", 0):
        t = idx.constant_tensor(node.input[1])
        if t is not None and t.data_type in FLOAT_TYPES and len(t.dims) == 2:
            return LinearReader(i, node.input[1], 1 if attr(node, "transB", 0) else 0)
    return None


def classify_readers(idx: GraphIndex, h: str, excluded: Callable[[NodeProto], bool]) -> Readers:
    """Sort the readers of ``h``; raise Reject naming a reader that is not linear in ``h``."""
    if h in idx.subgraph_reads:
        raise Reject(f"'{h}' is read inside a subgraph")
    r = Readers([], [], [], [], h in idx.graph_outputs)
    for i in idx.consumers.get(h, ()):
        node = idx.nodes[i]
        lin = linear_reader(idx, i, h)
        if lin is not None and not excluded(node):
            r.linear.append(lin)
        elif _const_mul(idx, node, h) is not None:
            r.fold_mul.append(i)
        elif node.domain in ("", "ai.onnx") and node.op_type in SHAPE_ONLY:
            r.shape.append(i)
        elif _linear_in(node, h):
            r.keep.append(i)
        else:
            raise Reject(f"{describe(node)} is not linear in '{h}'")
    return r


def _linear_in(node: NodeProto, h: str) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR_IN:
        return False
    slots = [k for k, n in enumerate(node.input) if n == h]
    allowed = LINEAR_IN[node.op_type]
    if node.op_type in ("Mul", "MatMul", "Einsum", "Gemm") and len(slots) > 1:
        return False  # h * h: quadratic
    return allowed is None or all(k in allowed for k in slots)


def _const_mul(idx: GraphIndex, node: NodeProto, h: str) -> int | None:
    """The slot of the constant in ``Mul(h, c)``, or None."""
    if not is_std(node, "Mul") or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    k = 1 if node.input[0] == h else 0
    t = idx.constant_tensor(node.input[k])
    return k if t is not None and t.data_type in FLOAT_TYPES else None


def weight_channels(model: Model, idx: GraphIndex, lin: LinearReader) -> np.ndarray:
    """The weight as float64 ``(K, N)``: rows meet ``h``'s channels (batched MatMul weights flattened)."""
    w = model.array(idx.constant_tensor(lin.weight)).astype(np.float64)
    return np.moveaxis(w, lin.k_axis, 0).reshape(w.shape[lin.k_axis], -1)


def check_width(idx: GraphIndex, linear: Sequence[LinearReader], width: int) -> None:
    for lin in linear:
        k = idx.constant_tensor(lin.weight).dims[lin.k_axis]
        if k != width:
            raise Reject(f"{describe(idx.nodes[lin.node])} weight has {k} input channels, expected {width}")


@dataclasses.dataclass
class ScaledReaders:
    """New constants for the readers of ``h`` under ``h = m * h'`` (computed, not yet written)."""

    weights: dict[str, np.ndarray]  # old weight name -> rescaled copy
    copied: set[str]  # weights that stay for other readers
    fold: dict[int, tuple[int, np.ndarray]]  # Mul node -> (constant slot, new constant)


def scale_readers(model: Model, idx: GraphIndex, readers: Readers, m: np.ndarray, h: str) -> ScaledReaders:
    weights: dict[str, np.ndarray] = {}
    copied: set[str] = set()
    mine = {lin.node for lin in readers.linear}
    for lin in readers.linear:
        if lin.weight in weights:
            continue
        t = idx.constant_tensor(lin.weight)
        w = model.array(t)
        shape = [1] * w.ndim
        shape[lin.k_axis] = m.size
        weights[lin.weight] = (w.astype(np.float64) * m.reshape(shape)).astype(w.dtype)
        others = [i for i in idx.consumers.get(lin.weight, ()) if i not in mine]
        if others or lin.weight in idx.graph_outputs:
            copied.add(lin.weight)
    fold = {}
    for i in readers.fold_mul:
        node = idx.nodes[i]
        k = _const_mul(idx, node, h)
        c = model.array(idx.constant_tensor(node.input[k]))
        fold[i] = (k, (c.astype(np.float64) * m).astype(c.dtype))
    return ScaledReaders(weights, copied, fold)


def count_readers(counts: Counter[str], idx: GraphIndex, readers: Readers, scaled: ScaledReaders) -> None:
    for lin in readers.linear:
        counts[idx.nodes[lin.node].op_type.lower()] += 1
    counts["mul-folded"] += len(readers.fold_mul)
    counts["shared-weight-copied"] += len(scaled.copied)
    counts["residual-mul"] += int(readers.restore)


@dataclasses.dataclass
class LayerNormPlan:
    """Rewrite a LayerNorm to output ``h' = h / m`` and its readers to match."""

    ln: LayerNormMatch
    m: np.ndarray
    gamma: np.ndarray  # gamma / m, float64 (H,)
    beta: np.ndarray  # beta / m
    dtype: np.dtype
    readers: Readers
    scaled: ScaledReaders


@dataclasses.dataclass
class InsertPlan:
    """Insert ``x' = Mul(x, 1 / m)`` in front of the linear readers of ``x``."""

    x: str
    m: np.ndarray
    dtype: np.dtype
    readers: Readers  # only ``linear`` is used: other readers keep x
    scaled: ScaledReaders


class _Edits:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names = NameAllocator(graph)
        self.before: dict[int, list[NodeProto]] = {}
        self.after: dict[int, list[NodeProto]] = {}
        self.drop: set[int] = set()
        self.old: set[str] = set()

    def const(self, hint: str, value: np.ndarray) -> str:
        return add_initializer(self.graph, self.names, hint, value)

    def finish(self, idx: GraphIndex) -> None:
        touched = set(self.before) | set(self.after) | self.drop
        replacements = {
            i: [*self.before.get(i, []), *([] if i in self.drop else [idx.nodes[i]]), *self.after.get(i, [])]
            for i in touched
        }
        rebuild_nodes(self.graph, replacements)
        drop_unread_constants(self.graph, self.old)


def apply_plans(model: Model, idx: GraphIndex, ln_plans: Sequence[LayerNormPlan], insert_plans: Sequence[InsertPlan]) -> None:
    """Mutate: every plan was computed from ``idx``; the node order stays topological."""
    e = _Edits(model.graph)
    for p in ln_plans:
        h_new = _rewrite_layernorm(e, idx, p)
        _rewire(e, idx, p.readers, p.scaled, p.ln.output, h_new)
        if p.readers.restore:
            m = e.const(f"{p.ln.output}_rescale", p.m.astype(p.dtype))
            last = max(x for x in (p.ln.anchor, p.ln.gamma_node, p.ln.beta_node) if x is not None)
            e.after.setdefault(last, []).append(make_node("Mul", [h_new, m], [p.ln.output], e.names, f"{p.ln.output}_restore"))
    for p in insert_plans:
        inv = e.const(f"{p.x}_smooth", (1.0 / p.m).astype(p.dtype))
        x_new = e.names.new(f"{p.x}_smoothed")
        first = min(lin.node for lin in p.readers.linear)
        e.before.setdefault(first, []).append(make_node("Mul", [p.x, inv], [x_new], e.names, f"{p.x}_smooth"))
        _rewire(e, idx, p.readers, p.scaled, p.x, x_new)
    e.finish(idx)


def _rewire(e: _Edits, idx: GraphIndex, readers: Readers, scaled: ScaledReaders, h: str, h_new: str) -> None:
    new_weights = {old: e.const(old, w) for old, w in scaled.weights.items()}
    e.old.update(scaled.weights)
    for lin in readers.linear:
        node = idx.nodes[lin.node]
        node.input[0] = h_new
        node.input[1] = new_weights[lin.weight]
    for i, (k, c) in scaled.fold.items():
        node = idx.nodes[i]
        e.old.add(node.input[k])
        node.input[k] = e.const(node.input[k], c)
        node.input[1 - k] = h_new
    for i in readers.shape:
        node = idx.nodes[i]
        for k, name in enumerate(node.input):
            if name == h:
                node.input[k] = h_new


def _rewrite_layernorm(e: _Edits, idx: GraphIndex, p: LayerNormPlan) -> str:
    """Rewrite gamma and beta; return the name of the new output ``h'``."""
    ln = p.ln
    gamma, beta = p.gamma.astype(p.dtype), p.beta.astype(p.dtype)
    e.old.update(n for n in (ln.gamma, ln.beta) if n)
    if ln.kind == "op":
        node = idx.nodes[ln.anchor]
        node.input[1] = e.const(ln.gamma or f"{ln.output}_scale", gamma)
        if ln.beta is not None or np.any(beta != 0):
            b = e.const(ln.beta or f"{ln.output}_bias", beta)
            if len(node.input) > 2:
                node.input[2] = b
            else:
                node.input.append(b)
        node.output[0] = e.names.new(f"{ln.output}_scaled")
        return node.output[0]
    anchor = idx.nodes[ln.anchor]
    base = ln.normalized
    tail = [i for i in (ln.gamma_node, ln.beta_node) if i is not None]
    e.drop.update(tail)
    if not tail:  # the output is the normalised tensor itself; h keeps its name for the restore Mul
        base = anchor.output[0] = e.names.new(f"{ln.output}_normalized")
    new_nodes = []
    hint = ln.output
    if np.any(gamma != 1):
        g = e.const(ln.gamma or f"{hint}_scale", gamma)
        out = e.names.new(f"{hint}_scaled")
        new_nodes.append(make_node("Mul", [base, g], [out], e.names, f"{hint}_mul"))
        base = out
    if np.any(beta != 0):
        b = e.const(ln.beta or f"{hint}_bias", beta)
        out = e.names.new(f"{hint}_scaled")
        new_nodes.append(make_node("Add", [base, b], [out], e.names, f"{hint}_add"))
        base = out
    last = max([ln.anchor, *tail])
    e.after.setdefault(last, [])[:0] = new_nodes
    return base


def layernorm_params(model: Model, idx: GraphIndex, ln: LayerNormMatch, width: int | None) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """(gamma, beta) as float64 vectors of the normalised width, and the dtype to write them in."""
    arrays = {}
    dtype = None
    for role in ("gamma", "beta"):
        name = getattr(ln, role)
        if name is None:
            continue
        t = idx.constant_tensor(name)
        if t is None:
            raise Reject(f"{role} {idx.why_not_constant(name)}")
        if t.data_type not in FLOAT_TYPES:
            raise Reject(f"{role} '{name}' is not floating point")
        a = model.array(t)
        dtype = dtype or a.dtype
        arrays[role] = a.astype(np.float64).reshape(-1)
    sizes = {a.size for a in arrays.values() if a.size > 1}
    if width is None:
        width = sizes.pop() if len(sizes) == 1 else None
    if width is None or any(s != width for s in sizes):
        raise Reject(f"cannot tell the normalised width (gamma/beta sizes {sorted(sizes)})")
    gamma = np.broadcast_to(arrays.get("gamma", np.ones(1)), (width,)).copy()
    beta = np.broadcast_to(arrays.get("beta", np.zeros(1)), (width,)).copy()
    return gamma, beta, np.dtype(dtype or np.float32)
