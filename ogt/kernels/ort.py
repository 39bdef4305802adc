"""The onnxruntime CPU kernel of ``Sparse24MatMul``, through onnxruntime-extensions.

onnxruntime-extensions (PyPI ``onnxruntime-extensions``, the ``kernels`` extra) ships a compiled
custom-op library whose Python-op bridge runs a registered numpy function inside an ordinary
``onnxruntime.InferenceSession``. :func:`register` registers :func:`~ogt.kernels.sparse24.sparse24_matmul`
with it; :func:`session_options` returns options with that library registered
(``so.register_custom_ops_library(onnxruntime_extensions.get_library_path())``).

Domain: the extensions library serves Python ops only in its own domain, ``ai.onnx.contrib``.
ogt writes its models in ``ai.ogt`` (one schema, one domain); :func:`for_onnxruntime` returns a
copy whose ``Sparse24MatMul`` nodes are in ``ai.onnx.contrib`` (same inputs, outputs, semantics),
and :func:`session` does that for you. A Python op lives in the process that registered it:
the session must be built in a process that imported this module and called :func:`register`.

Limits: float32 only (the bridge registers one type signature per op name); the function
decompresses the weight on every call and then runs one dense numpy product, and the bridge
copies the output through a Python list, so it is slower than onnxruntime's own MatMul (see
BENCHMARKS.md). It exists so that packed models run in onnxruntime and can be checked there.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from ..graph.io import load
from ..graph.model import Model
from . import sparse24

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_registered = False


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise ImportError(
            "the onnxruntime kernel of ai.ogt::Sparse24MatMul needs onnxruntime-extensions: "
            "pip install 'ogt[kernels]' (or pip install onnxruntime-extensions)"
        ) from None
    return onnxruntime_extensions


def register() -> None:
    """Register the kernel with onnxruntime-extensions' Python-op bridge (once per process)."""
    global _registered
    if _registered:
        return
    ext = _extensions()

    @ext.onnx_op(
        op_type=sparse24.OP_TYPE,
        inputs=[ext.PyCustomOpDef.dt_float, ext.PyCustomOpDef.dt_float, ext.PyCustomOpDef.dt_uint8],
        outputs=[ext.PyCustomOpDef.dt_float],
    )
    def _sparse24_matmul(x, values, meta):
        return sparse24.sparse24_matmul(x, values, meta)

    _registered = True


def library_path() -> str:
    return _extensions().get_library_path()


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """``options`` (or new ones) with the custom-op library registered and the kernel available."""
    register()
    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    return so


def for_onnxruntime(model: Model | onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``ai.ogt::Sparse24MatMul`` nodes are in onnxruntime-extensions' domain."""
    proto = model.proto if isinstance(model, Model) else model
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    moved = False
    for node in out.graph.node:
        if node.domain == sparse24.DOMAIN and node.op_type == sparse24.OP_TYPE:
            node.domain = EXTENSIONS_DOMAIN
            moved = True
    domains = {imp.domain for imp in out.opset_import}
    if moved and EXTENSIONS_DOMAIN not in domains:
        out.opset_import.append(onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    if not any(n.domain == sparse24.DOMAIN for n in out.graph.node):
        keep = [imp for imp in out.opset_import if imp.domain != sparse24.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def session(
    model: Model | onnx.ModelProto | str | os.PathLike,
    options: ort.SessionOptions | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An onnxruntime session for a model that may hold ``ai.ogt::Sparse24MatMul`` nodes."""
    m = model if isinstance(model, (Model, onnx.ModelProto)) else load(Path(model))
    if isinstance(m, Model) and m.uses_external_data():
        m = Model(_with_data(m), m.base_dir, m.source)
    proto = for_onnxruntime(m)
    return ort.InferenceSession(proto.SerializeToString(), session_options(options), providers=list(providers))


def _with_data(m: Model) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(m.proto)
    from ..graph import tensors

    for t in Model(proto, m.base_dir).iter_tensors():
        if tensors.is_external(t):
            tensors.set_data(t, m.array(t))
    return proto
