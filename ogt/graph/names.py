"""The one authority for new tensor and node names.

Names are identities: a new value gets a new name, allocated here so it never collides with
any name already used anywhere in the model (subgraphs included). Meaning is never parsed
back out of a name.
"""

from __future__ import annotations

from onnx import GraphProto

from .model import subgraphs


class NameAllocator:
    def __init__(self, graph: GraphProto):
        self._used: set[str] = set()
        self._collect(graph)

    def _collect(self, graph: GraphProto) -> None:
        used = self._used
        used.update(i.name for i in graph.input)
        used.update(o.name for o in graph.output)
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.value_info)
        for node in graph.node:
            used.update(node.output)
            used.update(node.input)
            if node.name:
                used.add(node.name)
            for g in subgraphs(node):
                self._collect(g)

    def new(self, hint: str) -> str:
        """A fresh name: ``hint`` itself when free, else ``hint_1``, ``hint_2``, ..."""
        hint = hint or "ogt"
        name, k = hint, 0
        while name in self._used:
            k += 1
            name = f"{hint}_{k}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> None:
        self._used.add(name)
