"""fold-constants: evaluate nodes whose inputs are all constants, strictly.

Each candidate node (default domain, every input an initializer or Constant output, no
subgraph, not random) is run alone through ``onnx.reference.ReferenceEvaluator`` at the model's
opset; its outputs become initializers under the same names and the node is removed. Nodes in
topological order, so chains fold in one pass. Anything that cannot be folded is reported in
``skipped`` with the evaluator's error, never swallowed; ``fail_on_error`` turns that into a
TransformError. Outputs larger than ``max_output_bytes`` are left alone (folding Expand or
Tile can blow up the file).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import ClassVar

import numpy as np
from onnx import NodeProto
from onnx.reference import ReferenceEvaluator

from ..errors import TransformError
from ..graph.build import rebuild_nodes
from ..graph.model import Model, subgraphs
from ..graph.query import GraphIndex, describe
from ..graph.validate import topological_order
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


@register
@dataclasses.dataclass(frozen=True)
class FoldConstants(Transform):
    """Evaluate all-constant nodes with the ONNX reference evaluator; report what cannot fold."""

    name: ClassVar[str] = "fold-constants"
    max_output_bytes: int = 64 * 2**20
    fail_on_error: bool = False

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        g = model.graph
        idx = GraphIndex(g)
        values: dict[str, np.ndarray] = {}
        folded: dict[int, list[NodeProto]] = {}
        skipped: list[Skip] = []
        opset = model.opset("") or 1
        for i in topological_order(g):
            node = idx.nodes[i]
            if not self._candidate(node, idx, values):
                continue
            try:
                outs = self._evaluate(model, idx, node, values, opset)
            except _NotFolded as exc:
                if self.fail_on_error:
                    raise TransformError(f"cannot fold {describe(node)}: {exc}") from exc
                skipped.append(Skip(node.name, node.op_type, str(exc)))
                continue
            values.update(outs)
            folded[i] = []
        if not folded:
            return TransformResult(model, False, {}, skipped)
        produced = {o for i in folded for o in idx.nodes[i].output if o}
        for name in produced:
            if name in values and any(c not in folded for c in idx.consumers.get(name, ())) or name in idx.graph_outputs:
                t = g.initializer.add()
                from ..graph.tensors import set_data

                t.name = name
                set_data(t, values[name])
        rebuild_nodes(g, folded)
        return TransformResult(model, True, counts_of(self.name, Counter(node=len(folded))), skipped)

    def _candidate(self, node: NodeProto, idx: GraphIndex, values: dict[str, np.ndarray]) -> bool:
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
            return False
        if any(True for _ in subgraphs(node)) or not any(node.input):
            return False
        return all(not n or n in values or idx.is_constant(n) for n in node.input)

    def _evaluate(self, model: Model, idx: GraphIndex, node: NodeProto, values, opset: int) -> dict[str, np.ndarray]:
        feeds = {}
        for n in node.input:
            if n:
                feeds[n] = values[n] if n in values else model.array(idx.constant_tensor(n))
        try:
            results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - reported per node, never swallowed
            raise _NotFolded(f"reference evaluation failed: {type(exc).__name__}: {exc}") from exc
        outs = {}
        for name, value in zip(node.output, results):
            if not name:
                continue
            arr = np.asarray(value)
            if arr.nbytes > self.max_output_bytes:
                raise _NotFolded(f"output '{name}' would be {arr.nbytes} bytes (max_output_bytes={self.max_output_bytes})")
            outs[name] = arr
        return outs


class _NotFolded(Exception):
    pass
