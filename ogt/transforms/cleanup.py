"""cleanup: remove what does not contribute to the outputs, merge what is identical, sort.

Steps, in order (each reported in ``counts``):

1. ``identity``: an Identity ``y = x`` is removed by reading ``x`` wherever ``y`` was read. When
   ``y`` is a graph output, ``x``'s producer is renamed to write ``y`` instead (outputs keep their
   names); an Identity from a graph input or initializer straight to an output must stay.
2. ``dead-node``: nodes from which no graph output is reachable.
3. ``initializer-input``: graph inputs that merely declare an initializer (IR >= 4).
4. ``unused-initializer``: initializers nothing reads.
5. ``duplicate-constant``: initializers (and Constant nodes) with identical dtype, shape and
   bytes are merged into the first one (the duplicates are deleted).
6. ``reordered``: nodes are put in a stable topological order (1 when the order changed).

Stale ``value_info`` entries for tensors that no longer exist are dropped as well.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import ClassVar

from onnx import GraphProto, NodeProto

from ..graph import tensors
from ..graph.build import drop_unread_constants, rebuild_nodes, remove_initializers
from ..graph.model import Model, subgraphs
from ..graph.query import GraphIndex, node_reads
from ..graph.validate import topological_order
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register


@register
@dataclasses.dataclass(frozen=True)
class Cleanup(Transform):
    """Dead code, Identity, duplicate-constant and unused-initializer removal plus toposort."""

    name: ClassVar[str] = "cleanup"
    remove_initializer_inputs: bool = True
    dedupe_constants: bool = True

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        g = model.graph
        counts: Counter[str] = Counter()
        skipped: list[Skip] = []
        counts["identity"] = _remove_identities(g, skipped)
        counts["dead-node"] = _remove_dead_nodes(g)
        if self.remove_initializer_inputs:
            counts["initializer-input"] = _remove_initializer_inputs(model, skipped)
        counts["unused-initializer"] = _remove_unused_initializers(g)
        if self.dedupe_constants:
            counts["duplicate-constant"] = _dedupe_initializers(model) + _dedupe_constant_nodes(g)
        counts["reordered"] = _toposort(g)
        counts["stale-value-info"] = _drop_stale_value_info(g)
        changed = any(counts.values())
        return TransformResult(model, changed, counts_of(self.name, counts), skipped)


def _rename_reads(graph: GraphProto, subst: dict[str, str]) -> None:
    """Rewrite every read of a key of ``subst`` (subgraphs included, unless shadowed)."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in subst:
                node.input[k] = subst[name]
        for sg in subgraphs(node):
            local = {i.name for i in sg.input} | {t.name for t in sg.initializer}
            local |= {o for n in sg.node for o in n.output}
            inner = {k: v for k, v in subst.items() if k not in local}
            if inner:
                _rename_reads(sg, inner)
                for o in sg.output:
                    if o.name in inner:
                        o.name = inner[o.name]


def _resolve(subst: dict[str, str], name: str) -> str:
    while name in subst:
        name = subst[name]
    return name


def _remove_identities(g: GraphProto, skipped: list[Skip]) -> int:
    idx = GraphIndex(g)
    subst: dict[str, str] = {}
    drop: set[int] = set()
    to_output: list[int] = []
    for i, node in enumerate(idx.nodes):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
            continue
        y = node.output[0]
        if y in idx.graph_outputs:
            to_output.append(i)
        else:
            subst[y] = node.input[0]
            drop.add(i)
    subst = {k: _resolve(subst, v) for k, v in subst.items()}
    renames: dict[str, str] = {}
    for i in to_output:
        node = idx.nodes[i]
        x, y = _resolve(subst, node.input[0]), node.output[0]
        reason = _output_identity_blocker(idx, x, i)
        if reason is None and x in renames:
            reason = f"'{x}' already feeds graph output '{renames[x]}' through another Identity"
        if reason:
            skipped.append(Skip(node.name, node.op_type, reason))
            continue
        renames[x] = y
        drop.add(i)
    if not drop:
        return 0
    rebuild_nodes(g, {i: [] for i in drop})
    subst.update(renames)
    _rename_reads(g, {k: _resolve(subst, k) for k in subst})
    for node in g.node:
        for k, out in enumerate(node.output):
            if out in renames:
                node.output[k] = renames[out]
    return len(drop)


def _output_identity_blocker(idx: GraphIndex, x: str, i: int) -> str | None:
    y = idx.nodes[i].output[0]
    if x in idx.graph_inputs or x in idx.initializers or x not in idx.producer:
        return f"maps graph input or initializer '{x}' to graph output '{y}'; removing it would rename an output"
    if x in idx.graph_outputs:
        return f"'{x}' and '{y}' are both graph outputs"
    if x in idx.subgraph_reads:
        return f"'{x}' is read inside a subgraph"
    return None


def _remove_dead_nodes(g: GraphProto) -> int:
    idx = GraphIndex(g)
    live: set[int] = set()
    stack = [o.name for o in g.output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        i = idx.producer.get(name)
        if i is None or i in live:
            continue
        live.add(i)
        stack.extend(node_reads(idx.nodes[i]))
    dead = {i for i in range(len(idx.nodes)) if i not in live}
    rebuild_nodes(g, {i: [] for i in dead})
    return len(dead)


def _remove_initializer_inputs(model: Model, skipped: list[Skip]) -> int:
    g = model.graph
    inits = {t.name for t in g.initializer}
    hits = [k for k, vi in enumerate(g.input) if vi.name in inits]
    if not hits:
        return 0
    if model.proto.ir_version < 4:
        skipped.append(Skip("", "graph-input", f"IR version {model.proto.ir_version} < 4 requires initializers to be listed as inputs"))
        return 0
    for k in reversed(hits):
        del g.input[k]
    return len(hits)


def _dedupe_initializers(model: Model) -> int:
    g = model.graph
    idx = GraphIndex(g)
    protected = idx.graph_inputs | idx.graph_outputs | idx.subgraph_reads
    groups: dict[tuple, list] = defaultdict(list)
    for t in g.initializer:
        if t.name not in protected:
            groups[(t.data_type, tuple(t.dims), tensors.nbytes(t))].append(t)
    subst: dict[str, str] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        by_sample: dict[str, list] = defaultdict(list)
        for t in group:
            by_sample[tensors.sample_digest(t, model.base_dir)].append(t)
        candidates = [t for same in by_sample.values() if len(same) > 1 for t in same]
        first_by_digest: dict[str, str] = {}
        for t in candidates:  # full hash only where the cheap key collides
            d = tensors.digest(t, model.base_dir)
            if d in first_by_digest:
                subst[t.name] = first_by_digest[d]
            else:
                first_by_digest[d] = t.name
    if subst:
        _rename_reads(g, subst)
        remove_initializers(g, set(subst))
    return len(subst)


def _dedupe_constant_nodes(g: GraphProto) -> int:
    idx = GraphIndex(g)
    first: dict[bytes, str] = {}
    subst: dict[str, str] = {}
    drop: dict[int, list[NodeProto]] = {}
    for i, node in enumerate(idx.nodes):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.output[0]
        if out in idx.graph_outputs or out in idx.subgraph_reads:
            continue
        key = b"".join(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))
        if key in first:
            subst[out] = first[key]
            drop[i] = []
        else:
            first[key] = out
    if subst:
        rebuild_nodes(g, drop)
        _rename_reads(g, subst)
    return len(subst)


def _remove_unused_initializers(g: GraphProto) -> int:
    return drop_unread_constants(g, {t.name for t in g.initializer})


def _toposort(g: GraphProto) -> int:
    order = topological_order(g)
    if order == list(range(len(order))):
        return 0
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return 1


def _drop_stale_value_info(g: GraphProto) -> int:
    live = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    stale = [k for k, vi in enumerate(g.value_info) if vi.name not in live]
    for k in reversed(stale):
        del g.value_info[k]
    return len(stale)


__all__ = ["Cleanup"]
