"""Node and constant factories. Plain functions; every new name comes from a NameAllocator."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto

from . import tensors
from .names import NameAllocator
from .query import GraphIndex


def add_initializer(graph: GraphProto, names: NameAllocator, hint: str, array: np.ndarray) -> str:
    """Append a new initializer holding ``array`` under a fresh name; return the name."""
    name = names.new(hint)
    t = graph.initializer.add()
    t.name = name
    tensors.set_data(t, array)
    return name


def set_constant(tensor: TensorProto, array: np.ndarray) -> None:
    """Overwrite a constant's values in place (initializer or Constant-node tensor)."""
    tensors.set_data(tensor, array)


def make_node(op_type: str, inputs: list[str], outputs: list[str], names: NameAllocator, hint: str, **attrs) -> NodeProto:
    return onnx.helper.make_node(op_type, inputs, outputs, name=names.new(hint), **attrs)


def set_attr(node: NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def rebuild_nodes(graph: GraphProto, replacements: dict[int, list[NodeProto]]) -> None:
    """Replace node ``i`` by ``replacements[i]`` (an empty list deletes it), keeping order."""
    if not replacements:
        return
    new_nodes: list[NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in replacements:
            new_nodes.extend(replacements[i])
        else:
            new_nodes.append(node)
    del graph.node[:]  # detached messages stay valid; extend copies them back in
    graph.node.extend(new_nodes)


def drop_unread_constants(graph: GraphProto, names: set[str]) -> int:
    """Delete those of ``names`` (initializers or Constant-node outputs) that nothing reads,
    that are not graph inputs or outputs; return how many were deleted."""
    idx = GraphIndex(graph)
    unread = {
        n for n in names if not idx.consumers.get(n) and n not in idx.graph_outputs and n not in idx.graph_inputs
    }
    if not unread:
        return 0
    removed = remove_initializers(graph, unread)
    dead = {i: [] for i, node in enumerate(idx.nodes) if node.op_type == "Constant" and node.output[0] in unread}
    rebuild_nodes(graph, dead)
    return removed + len(dead)


def remove_initializers(graph: GraphProto, names: set[str]) -> int:
    """Delete the initializers named in ``names``; return how many were removed."""
    idx = [i for i, t in enumerate(graph.initializer) if t.name in names]
    for i in reversed(idx):
        del graph.initializer[i]
    return len(idx)
