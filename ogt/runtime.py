"""onnxruntime sessions over in-memory models without serializing their weights.

``InferenceSession(model.SerializeToString())`` copies every weight twice (into the bytes, then
into the session) and parses them again: 0.25 s for MiniLM's 69 MB, and ``ogt quantize`` opens
four sessions over it. :func:`session_from_proto` hands the large initializers to onnxruntime
as OrtValues over their own bytes instead (``SessionOptions.add_external_initializers``, which
copies them once while the session is created), so only the graph is serialized: 0.1 s for the
same model, the same outputs bit for bit, and one copy of the weights per session instead of two.
The sessions also run without onnxruntime's CPU memory arena: ogt holds several sessions at once
(float reference, placement trial, quantized model), and each arena would keep its largest batch
of intermediate tensors allocated after the run.

The graph that is serialized is a separate skeleton (the model's fields, the small initializers
copied, the large ones as external-data stubs), not ``proto`` with its weights taken out and put
back: with protobuf's upb backend, assigning ``raw_data`` again copies the bytes into the
message's arena, which keeps them until the whole model is freed, so every session over the same
model added a copy of its weights to the process (noisy-bias, which opens a few sessions per
quantizer over the 69 MB MiniLM-L3, peaked at 2.0 GB instead of 0.7 GB).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

#: Initializers with at least this many bytes of raw data are handed over in memory.
LIFT_BYTES = 1 << 16


def session_from_proto(proto: onnx.ModelProto, options: ort.SessionOptions,
                       providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """A session over ``proto`` (left untouched) with its large raw-data initializers passed in memory."""
    skeleton = onnx.ModelProto()
    _copy_fields(proto, skeleton, skip="graph")
    graph = skeleton.graph
    _copy_fields(proto.graph, graph, skip="initializer")
    names, values = [], []
    for t in proto.graph.initializer:
        raw = None if t.HasField("data_location") else t.raw_data
        dtype = _liftable(t, raw)
        if dtype is None:
            graph.initializer.add().CopyFrom(t)
            continue
        stub = graph.initializer.add()
        _copy_fields(t, stub, skip="raw_data")
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "ogt-in-memory"
        names.append(t.name)  # onnxruntime copies the data while it creates the session
        values.append(ort.OrtValue.ortvalue_from_numpy(np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))))
    if names:
        options.add_external_initializers(names, values)
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(skeleton.SerializeToString(), options, providers=list(providers))


def _liftable(t: TensorProto, raw: bytes | None) -> np.dtype | None:
    """The numpy dtype of an initializer (``raw``: its raw data) to hand over in memory, or None to keep it inline."""
    if raw is None or len(raw) < LIFT_BYTES:
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.itemsize == 0 or dtype.kind not in "biufc":
        return None  # 4-bit and string tensors stay inline
    return dtype


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated (messages are copied)
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


__all__ = ["LIFT_BYTES", "session_from_proto"]
