"""pack-nm: store 2:4-sparse MatMul / Gemm weights compressed, run by ``ai.ogt::Sparse24MatMul``.

``X @ W`` (MatMul, ``W[K, N]``) and ``Gemm(X, B, C)`` (``alpha = 1``, ``transA = 0``, ``B[K, N]``
or ``B[N, K]`` with ``transB = 1``) whose constant float32 weight has at most 2 non-zeros in
every 4 consecutive values along K become::

    Y = Sparse24MatMul(X, values, meta)         # + Add(Y, beta * C) for a Gemm with a bias

with ``values[N, K/2]`` the kept weights and ``meta`` uint8 ``[N, ceil(K/8)]`` their 2-bit
positions (layout: :mod:`ogt.kernels.sparse24`; ``unpack(values, meta) == W.T`` bit for bit).
The model imports the ``ai.ogt`` opset; onnxruntime runs it through :func:`ogt.kernels.ort.session`,
``onnx.reference.ReferenceEvaluator`` with ``new_ops=[ogt.kernels.Sparse24MatMul]``.

Skipped with a reason: weights that are not 2:4 sparse (run prune-nm first), not float32 (the
onnxruntime kernel is float32), K not a multiple of 4, Gemm with ``alpha != 1`` or ``transA``,
layers matching ``exclude``. Convolutions are not packed (TensorRT runs them sparse from the
dense layout).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx
from onnx import NodeProto, TensorProto

from ..graph.build import (
    add_initializer,
    drop_unread_constants,
    make_node,
    rebuild_nodes,
)
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, attr
from ..kernels import sparse24
from . import _nm
from ._base import (
    Skip,
    Transform,
    TransformContext,
    TransformResult,
    counts_of,
    register,
)
from .prune_nm import Layer, Reject, layer_of


@dataclasses.dataclass
class _Pack:
    layer: Layer
    values: np.ndarray
    meta: np.ndarray
    bias: np.ndarray | str | None  # array: beta * C computed; str: C as is


@register
@dataclasses.dataclass(frozen=True)
class PackNM(Transform):
    """Replace 2:4-sparse MatMul/Gemm weights by kept values + 2-bit positions (ai.ogt::Sparse24MatMul).

    exclude: globs on node name or op type.
    """

    name: ClassVar[str] = "pack-nm"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        idx = GraphIndex(model.graph)
        packs: list[_Pack] = []
        skipped: list[Skip] = []
        for i, node in enumerate(idx.nodes):
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            if node.op_type == "MatMul" and not (idx.is_constant(node.input[0]) or idx.is_constant(node.input[1])):
                continue
            try:
                packs.append(self._plan(model, idx, i))
            except Reject as r:
                skipped.append(Skip(node.name, node.op_type, str(r)))
        counts: Counter[str] = Counter()
        for p in packs:
            counts[p.layer.kind] += 1
            counts["dense-bytes"] += p.values.nbytes * 2
            counts["packed-bytes"] += p.values.nbytes + p.meta.nbytes
        if packs:
            _mutate(model, idx, packs)
        return TransformResult(model, bool(packs), counts_of(self.name, counts), skipped)

    def _plan(self, model: Model, idx: GraphIndex, i: int) -> _Pack:
        node = idx.nodes[i]
        for pat in self.exclude:
            if fnmatch.fnmatchcase(node.name, pat) or fnmatch.fnmatchcase(node.op_type, pat):
                raise Reject(f"excluded by pattern '{pat}'")
        layer = layer_of(model, idx, i, sparse24.M)
        if layer.tensor.data_type != TensorProto.FLOAT:
            raise Reject("weight is not float32 (the onnxruntime kernel of Sparse24MatMul is float32)")
        bias: np.ndarray | str | None = None
        if node.op_type == "Gemm":
            if float(attr(node, "alpha", 1.0)) != 1.0 or int(attr(node, "transA", 0)):
                raise Reject("Gemm with alpha != 1 or transA=1 is not packed")
            if len(node.input) > 2 and node.input[2]:
                beta = float(attr(node, "beta", 1.0))
                if beta == 1.0:
                    bias = node.input[2]
                else:
                    c = idx.constant_tensor(node.input[2])
                    if c is None:
                        raise Reject(f"Gemm bias C is not a constant and beta={beta} != 1")
                    bias = (model.array(c) * np.float32(beta)).astype(np.float32)
        rows = _nm.to_rows(model.array(layer.tensor), layer.layout)
        if not _nm.is_nm(rows, sparse24.N, sparse24.M):
            frac = _nm.compliant_fraction(rows, sparse24.N, sparse24.M)
            raise Reject(f"weight is not 2:4 sparse ({frac:.0%} of groups of 4 have at most 2 non-zeros); run prune-nm first")
        values, meta = sparse24.pack(np.ascontiguousarray(rows))
        return _Pack(layer, values, meta, bias)


def _mutate(model: Model, idx: GraphIndex, packs: list[_Pack]) -> None:
    g = model.graph
    names = NameAllocator(g)
    replacements: dict[int, list[NodeProto]] = {}
    old: set[str] = set()
    for p in packs:
        node, base = p.layer.node, p.layer.node.name or p.layer.kind
        old.update(n for n in node.input[1:] if n)
        values = add_initializer(g, names, f"{p.layer.weight}.values", p.values)
        meta = add_initializer(g, names, f"{p.layer.weight}.meta", p.meta)
        y = node.output[0]
        mm_out = y if p.bias is None else names.new(f"{base}.product")
        new = [onnx.helper.make_node(sparse24.OP_TYPE, [node.input[0], values, meta], [mm_out],
                                     name=names.new(f"{base}.sparse24"), domain=sparse24.DOMAIN)]
        if p.bias is not None:
            c = p.bias if isinstance(p.bias, str) else add_initializer(g, names, f"{base}.bias", p.bias)
            new.append(make_node("Add", [mm_out, c], [y], names, f"{base}.bias_add"))
        replacements[p.layer.index] = new
    rebuild_nodes(g, replacements)
    drop_unread_constants(g, old)
    if not any(imp.domain == sparse24.DOMAIN for imp in model.proto.opset_import):
        model.proto.opset_import.append(onnx.helper.make_opsetid(sparse24.DOMAIN, sparse24.VERSION))
