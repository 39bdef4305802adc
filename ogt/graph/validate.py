"""Invariants a model must satisfy when loaded and after every transform.

- opset and IR versions this onnx installation knows;
- every tensor produced once (SSA), every node input and graph output defined;
- no cycles: the nodes admit a topological order (``topological_order`` returns it).
"""

from __future__ import annotations

import heapq
import logging

import onnx
from onnx import GraphProto

from ..errors import InvalidGraphError, UnsupportedModelError
from .model import Model, subgraphs
from .query import describe, node_reads

log = logging.getLogger(__name__)

_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}


def check_versions(model: Model) -> None:
    proto = model.proto
    if proto.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"model IR version {proto.ir_version} is newer than this onnx ({onnx.__version__}) supports "
            f"(max {onnx.IR_VERSION}); upgrade onnx"
        )
    if not proto.opset_import:
        raise UnsupportedModelError("model declares no opset_import; cannot tell which operator set it uses")
    schema = onnx.defs.onnx_opset_version()
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= schema:
            raise UnsupportedModelError(
                f"model uses default-domain opset {imp.version}; this onnx ({onnx.__version__}) knows opsets 1..{schema}"
            )
        if imp.domain not in _KNOWN_DOMAINS:
            log.info("custom operator domain '%s' (version %d): its ops are passed through untouched", imp.domain, imp.version)
    declared = {_norm(imp.domain) for imp in proto.opset_import}
    for dom in sorted({_norm(n.domain) for n in proto.graph.node} - declared):
        raise UnsupportedModelError(f"nodes use operator domain '{dom or 'ai.onnx'}' but the model imports no opset for it")


def _norm(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def check_graph(graph: GraphProto, outer: frozenset[str] = frozenset(), where: str = "graph") -> None:
    """Raise InvalidGraphError on duplicate producers, undefined inputs or cycles."""
    defined: dict[str, str] = {}
    for i in graph.input:
        if i.name in defined:
            raise InvalidGraphError(f"{where}: graph input '{i.name}' is declared twice")
        defined[i.name] = "graph input"
    seen_inits: set[str] = set()
    for t in graph.initializer:
        if t.name in seen_inits:
            raise InvalidGraphError(f"{where}: initializer '{t.name}' is defined twice")
        seen_inits.add(t.name)
        defined.setdefault(t.name, "initializer")  # an initializer may also be a graph input (its default)
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in defined:
                raise InvalidGraphError(
                    f"{where}: tensor '{out}' is produced twice ({defined[out]} and {describe(node)})"
                )
            defined[out] = describe(node)
    visible = set(defined) | outer
    for node in graph.node:
        for name in node.input:
            if name and name not in visible:
                raise InvalidGraphError(
                    f"{where}: {describe(node)} reads tensor '{name}', which nothing produces (dangling input)"
                )
        for g in subgraphs(node):
            check_graph(g, frozenset(visible), where=f"subgraph '{g.name}' of {describe(node)}")
    for out in graph.output:
        if out.name not in visible:
            raise InvalidGraphError(f"{where}: output '{out.name}' is not produced by any node, input or initializer")
    topological_order(graph, outer)


def topological_order(graph: GraphProto, outer: frozenset[str] | set[str] = frozenset()) -> list[int]:
    """Node positions in a topological order, stable (original order breaks ties).

    Raises InvalidGraphError naming the nodes on a cycle.
    """
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(outer)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    waiting = [0] * len(nodes)
    dependents: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        deps = {producer[n] for n in node_reads(node) if n in producer and n not in available}
        waiting[i] = len(deps)
        for d in deps:
            dependents[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = [describe(nodes[i]) for i in range(len(nodes)) if waiting[i] > 0]
        raise InvalidGraphError(f"graph has a cycle through {', '.join(stuck[:5])}" + (" ..." if len(stuck) > 5 else ""))
    return order


def validate(model: Model) -> None:
    check_versions(model)
    check_graph(model.graph)
