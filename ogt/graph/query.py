"""Read-only questions about a graph: who produces a tensor, who consumes it, is it constant.

A :class:`GraphIndex` is a snapshot: build it, plan a rewrite, then mutate. Never keep one
across a mutation. Nodes are identified by their position in ``graph.node``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, numpy_helper

from .model import Model, subgraphs


def subgraph_outer_refs(node: NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    refs: set[str] = set()
    for g in subgraphs(node):
        refs |= graph_outer_refs(g)
    return refs


def graph_outer_refs(graph: GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        used |= subgraph_outer_refs(node)
        defined.update(o for o in node.output if o)
    used.update(o.name for o in graph.output)
    return used - defined


def node_reads(node: NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs plus outer-scope names used by its subgraphs."""
    reads = [n for n in node.input if n]
    if any(True for _ in subgraphs(node)):
        reads.extend(sorted(subgraph_outer_refs(node) - set(reads)))
    return reads


class GraphIndex:
    """Producers, consumers and constants of one graph, computed once."""

    def __init__(self, graph: GraphProto):
        self.graph = graph
        self.nodes: list[NodeProto] = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.subgraph_reads: set[str] = set()
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for name in dict.fromkeys(n for n in node.input if n):
                self.consumers[name].append(i)
            outer = subgraph_outer_refs(node) if any(True for _ in subgraphs(node)) else set()
            for name in sorted(outer - set(node.input)):
                self.consumers[name].append(i)
            self.subgraph_reads |= outer
        self.initializers: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs: set[str] = {i.name for i in graph.input}
        self.graph_outputs: set[str] = {o.name for o in graph.output}

    def node(self, i: int) -> NodeProto:
        return self.nodes[i]

    def producer_of(self, name: str) -> NodeProto | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def use_count(self, name: str) -> int:
        """How many nodes read ``name``, plus one if it is a graph output."""
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def other_users(self, name: str, but: int) -> list[str]:
        """Descriptions of whatever else reads ``name`` besides node ``but``."""
        users = [_describe(self.nodes[i]) for i in self.consumers.get(name, ()) if i != but]
        if name in self.graph_outputs:
            users.append("the graph output")
        return users

    def constant_tensor(self, name: str) -> TensorProto | None:
        """The tensor behind ``name`` if it is constant: an initializer (not overridable) or a Constant node."""
        if name in self.initializers and name not in self.graph_inputs:
            return self.initializers[name]
        i = self.producer.get(name)
        if i is not None:
            return constant_node_tensor(self.nodes[i])
        return None

    def constant_storage(self, name: str) -> TensorProto | None:
        """Like constant_tensor, but only a TensorProto stored in the graph (so it can be rewritten in place)."""
        if name in self.initializers and name not in self.graph_inputs:
            return self.initializers[name]
        i = self.producer.get(name)
        node = None if i is None else self.nodes[i]
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == AttributeProto.TENSOR:
                    return a.t
        return None

    def why_not_constant(self, name: str) -> str:
        if name in self.initializers and name in self.graph_inputs:
            return f"'{name}' is an initializer that is also a graph input (overridable at run time); run cleanup first"
        return f"'{name}' is not a constant"

    def is_constant(self, name: str) -> bool:
        return self.constant_tensor(name) is not None


def constant_node_tensor(node: NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto (None for other nodes or sparse values)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
        if attr.name in _SCALAR_ATTRS:
            arr = np.asarray(onnx.helper.get_attribute_value(attr), dtype=_SCALAR_ATTRS[attr.name])
            t = numpy_helper.from_array(arr, name=node.output[0])
            return t
    return None


_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def constant_array(model: Model, index: GraphIndex, name: str) -> np.ndarray | None:
    t = index.constant_tensor(name)
    return None if t is None else model.array(t)


def attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _describe(node: NodeProto) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} (output '{node.output[0]}')"


def describe(node: NodeProto) -> str:
    return _describe(node)


@dataclass(frozen=True)
class TensorInfo:
    elem_type: int
    shape: tuple[int | str | None, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


#: Initializers up to this size keep their values in infer_types' skeleton (Reshape targets,
#: Slice bounds, axes), so that shape inference can compute the shapes that depend on them.
SKELETON_VALUE_BYTES = 1024


def infer_types(model: Model) -> dict[str, TensorInfo]:
    """Element types and shapes of every tensor onnx shape inference can reach.

    Runs on a skeleton of the model whose large initializers are declared as typed inputs without
    data, so it costs no tensor memory even for multi-gigabyte models; small ones keep their values.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.proto.ir_version
    skeleton.opset_import.extend(model.proto.opset_import)
    skeleton.functions.extend(model.proto.functions)
    g = skeleton.graph
    src = model.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if t.name in declared:
            continue
        small = int(np.prod(t.dims, dtype=np.int64)) <= SKELETON_VALUE_BYTES // 8  # from dims: ByteSize() is slow
        if small and t.data_location != TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; callers treat missing info as unknown
        inferred = skeleton
    out: dict[str, TensorInfo] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        out[vi.name] = _value_info(vi)
    for t in src.initializer:
        out[t.name] = TensorInfo(t.data_type, tuple(int(d) for d in t.dims))
    return out


def _value_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return TensorInfo(0, None)
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(tt.elem_type, tuple(dims))
