"""The in-memory model every transform works on: an ONNX ModelProto plus its data folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto

from . import tensors


class Model:
    """An ONNX model whose external tensor data stays on disk until read.

    ``proto`` is the ModelProto; tensors stored as external data keep their references and
    are resolved against ``base_dir`` (the folder the model was loaded from). Transforms
    mutate ``proto`` in place; use :meth:`copy` to keep an original.
    """

    def __init__(self, proto: onnx.ModelProto, base_dir: Path | None = None, source: Path | None = None):
        self.proto = proto
        self.base_dir = base_dir
        self.source = source

    @property
    def graph(self) -> GraphProto:
        return self.proto.graph

    def opset(self, domain: str = "") -> int | None:
        for imp in self.proto.opset_import:
            if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
                return int(imp.version)
        return None

    def array(self, tensor: TensorProto) -> np.ndarray:
        return tensors.to_array(tensor, self.base_dir)

    def copy(self) -> Model:
        """A deep copy of the proto (external data is shared on disk, not copied)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return Model(proto, self.base_dir, self.source)

    def iter_tensors(self) -> Iterator[TensorProto]:
        """Every TensorProto carrying data: initializers and tensor attributes, in subgraphs too."""
        yield from iter_graph_tensors(self.graph)

    def uses_external_data(self) -> bool:
        return any(tensors.is_external(t) for t in self.iter_tensors())

    def weight_bytes(self) -> int:
        return sum(tensors.nbytes(t) for t in self.iter_tensors())

    def __repr__(self) -> str:
        return f"Model(graph={self.graph.name!r}, nodes={len(self.graph.node)}, source={self.source})"


def iter_graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from iter_node_tensors(node)


def iter_node_tensors(node: NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == AttributeProto.TENSORS:
            yield from attr.tensors
        elif attr.type == AttributeProto.GRAPH:
            yield from iter_graph_tensors(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield from iter_graph_tensors(g)


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs
