"""session_from_proto: large initializers passed in memory give the same session, the proto untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ogt.runtime import LIFT_BYTES, session_from_proto


def _options() -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return o


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int64])
def test_lifted_initializers_compute_what_inline_ones_do_and_the_proto_is_restored(dtype):
    rng = np.random.default_rng(0)
    n = LIFT_BYTES // np.dtype(dtype).itemsize  # exactly at the threshold: lifted
    big = (rng.normal(size=(n,)) * 10).astype(dtype)
    small = (rng.normal(size=(4,)) * 10).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["big", "i"], ["g"]), helper.make_node("Add", ["g", "small"], ["y"])],
        "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", elem, [4])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    feeds = {"i": np.array([0, 7, n - 1, 3], np.int64)}
    want = ort.InferenceSession(before, _options(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    session = session_from_proto(model, _options())
    assert model.SerializeToString() == before  # restored byte for byte
    np.testing.assert_array_equal(session.run(None, feeds)[0], want)
    np.testing.assert_array_equal(want, big[feeds["i"]] + small)


def test_a_failing_session_leaves_the_proto_restored():
    big = np.zeros(LIFT_BYTES, np.float32)
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["big"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(big, "big")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own types
        session_from_proto(model, _options())
    assert model.SerializeToString() == before
    assert onnx.load_from_string(before).graph.initializer[0].raw_data


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_sessions_over_one_model_do_not_keep_copies_of_its_weights():
    # regression: taking raw_data out of the proto and putting it back made protobuf (upb) keep
    # a copy of every lifted weight per session until the model was freed (noisy-bias, which
    # opens sessions per quantizer over one model, peaked at 2.0 GB on MiniLM-L3; now 0.7 GB)
    import gc

    if _rss_bytes() is None:
        pytest.skip("needs /proc/self/status")
    size = 32 << 20
    big = np.ones(size // 4, np.float32)
    graph = helper.make_graph([helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(big, "big")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del big
    session_from_proto(model, _options()).run(None, {})  # first one: allocator warm-up
    gc.collect()
    start = _rss_bytes()
    for _ in range(8):
        assert session_from_proto(model, _options()).run(None, {})[0] == size // 4
        gc.collect()
    grown = _rss_bytes() - start
    assert grown < 4 * size, f"RSS grew {grown >> 20} MB over 8 sessions of a {size >> 20} MB weight"
