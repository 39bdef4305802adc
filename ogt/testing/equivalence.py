"""``assert_equivalent``: the equivalence oracle for transforms.

Both models run in onnxruntime on the CPU with every graph optimisation disabled, so a runtime
fusion cannot hide a broken rewrite. Outputs are compared by name with the tolerance table; on
a mismatch every intermediate tensor the two graphs share by name is exposed and the first one
(in the reference graph's topological order) that diverges is named in the error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import EquivalenceError
from ..graph.io import load, save
from ..graph.model import Model
from ..graph.query import GraphIndex, describe, infer_types
from ..graph.validate import topological_order
from ..runtime import session_from_proto
from .tolerances import Tolerance, compare

ModelLike = Model | onnx.ModelProto | str | os.PathLike


def as_model(m: ModelLike) -> Model:
    if isinstance(m, Model):
        return m
    if isinstance(m, onnx.ModelProto):
        return Model(m)
    return load(m)


def random_feeds(model: ModelLike, *, seed: int = 0, dim_value: int = 2, int_high: int = 10) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: normal floats, ints in [0, int_high), symbolic dims = dim_value."""
    m = as_model(model)
    rng = np.random.default_rng(seed)
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim_value for d in tt.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, int_high, shape).astype(dtype)
    return feeds


def run(model: ModelLike, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run in onnxruntime CPU with graph optimisations disabled; returns outputs by name."""
    return Runner(model, outputs)(feeds)


class Runner:
    """One onnxruntime session (optimisations off) for many runs; ``outputs`` adds intermediate tensors."""

    def __init__(self, model: ModelLike, outputs: list[str] | None = None):
        m = as_model(model)
        if m.uses_external_data():
            with tempfile.TemporaryDirectory(prefix="ogt-eq-") as tmp:
                self.session = _session(m, Path(tmp), outputs)
        else:  # no temporary folder: creating and removing one costs ~0.1 s on some file systems
            self.session = _session(m, None, outputs)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def _session(m: Model, tmp: Path | None, extra_outputs: list[str] | None) -> ort.InferenceSession:
    """Session over ``m`` with ``extra_outputs`` exposed. The outputs are appended to ``m.proto``
    for the time it takes to serialize and removed again (a copy of a large model costs more)."""
    proto = m.proto
    added = 0
    if extra_outputs:
        types = infer_types(m)
        present = {o.name for o in proto.graph.output}
        for name in dict.fromkeys(extra_outputs):
            info = types.get(name)
            if name not in present and info is not None and info.elem_type:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, info.elem_type, None))
                added += 1
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        if tmp is not None:
            path = tmp / "model.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            save(Model(copy, m.base_dir, None), path, external_data=True)
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session_from_proto(proto, opts)
    finally:
        for _ in range(added):
            proto.graph.output.pop()


def assert_equivalent(
    before: ModelLike,
    after: ModelLike,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> None:
    """Raise EquivalenceError unless ``after`` computes what ``before`` computes.

    feeds: inputs to use; default random ones from ``before``'s input spec (see random_feeds).
    tolerance: override the per-dtype table (see ogt.testing.tolerances).
    """
    ref, new = as_model(before), as_model(after)
    feeds = feeds if feeds is not None else random_feeds(ref, seed=seed)
    ref_out = [o.name for o in ref.graph.output]
    new_out = [o.name for o in new.graph.output]
    if sorted(ref_out) != sorted(new_out):
        raise EquivalenceError(f"graph outputs differ: before {ref_out}, after {new_out}")
    a, b = run(ref, feeds), run(new, feeds)
    failures = []
    for name in ref_out:
        c = compare(b[name], a[name], tolerance)
        if not c.ok:
            failures.append(f"output '{name}': {c.describe()}" if a[name].shape == b[name].shape
                            else f"output '{name}': shape {b[name].shape} != {a[name].shape}")
    if failures:
        raise EquivalenceError("; ".join(failures) + "\n" + first_divergence(ref, new, feeds, tolerance))


def first_divergence(before: Model, after: Model, feeds: dict[str, np.ndarray], tolerance: Tolerance | None = None) -> str:
    """Name the first intermediate tensor, shared by name, whose values differ."""
    order = topological_order(before.graph)
    idx_b, idx_a = GraphIndex(before.graph), GraphIndex(after.graph)
    shared = [
        o
        for i in order
        if idx_b.nodes[i].op_type != "Constant"
        for o in idx_b.nodes[i].output
        if o and o in idx_a.producer
    ]
    if not shared:
        return "no intermediate tensor is shared by name between the two graphs"
    try:
        a, b = run(before, feeds, shared), run(after, feeds, shared)
    except Exception as exc:  # noqa: BLE001 - diagnosis is best effort; the mismatch is already known
        return f"(could not expose intermediate tensors: {exc})"
    for name in shared:
        if name in a and name in b:
            c = compare(b[name], a[name], tolerance)
            if not c.ok:
                pb, pa = idx_b.producer_of(name), idx_a.producer_of(name)
                return (
                    f"first diverging tensor: '{name}' (before: {describe(pb)}; after: {describe(pa)}): {c.describe()}"
                )
    return "all shared intermediate tensors agree; the divergence is in tensors renamed by the transform"
