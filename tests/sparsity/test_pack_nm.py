"""pack-nm and Sparse24MatMul's kernels: the packed model equals the pruned dense model in onnxruntime,
the reference kernel equals the onnxruntime kernel, skips with reasons, real MiniLM."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import ogt
from ogt.kernels import DOMAIN, OP_TYPE, Sparse24MatMul, unpack
from ogt.kernels import ort as kort
from ogt.testing import random_feeds
from ogt.testing.equivalence import run
from ogt.testing.tolerances import compare
from ogt.transforms.pack_nm import PackNM
from ogt.transforms.prune_nm import PruneNM

pytest.importorskip("onnxruntime_extensions")


@st.composite
def dense_graphs(draw) -> onnx.ModelProto:
    """MatMul (2-D or 3-D input, + Add bias) or Gemm (transB, bias C, beta) with a random float32 weight."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    k, n = 4 * draw(st.integers(1, 6)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["matmul", "matmul-add", "gemm"]))
    inits, nodes = [], []
    if kind == "gemm":
        x_shape = [draw(st.integers(1, 4)), k]
        trans_b = draw(st.integers(0, 1))
        inits.append(numpy_helper.from_array(rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32), "W"))
        inputs = ["x", "W"]
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"))
            inputs.append("C")
        nodes.append(helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b,
                                      beta=draw(st.sampled_from([1.0, 0.5]))))
    else:
        x_shape = draw(st.sampled_from([[3, k], [2, 3, k]]))
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"))
        out = "y" if kind == "matmul" else "p"
        nodes.append(helper.make_node("MatMul", ["x", "W"], [out], name="mm"))
        if kind == "matmul-add":
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
            nodes.append(helper.make_node("Add", ["p", "b"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def pruned_and_packed(proto: onnx.ModelProto) -> tuple[ogt.Model, ogt.TransformResult]:
    pruned = PruneNM()(ogt.Model(copy.deepcopy(proto))).graph
    return pruned, PackNM()(pruned.copy())


def ort_outputs(model: ogt.Model, feeds) -> dict[str, np.ndarray]:
    session = kort.session(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@given(dense_graphs())
def test_packed_model_equals_pruned_dense_model_in_onnxruntime(proto):
    pruned, result = pruned_and_packed(proto)
    assert result.changed
    ops = [(n.domain, n.op_type) for n in result.graph.graph.node]
    assert (DOMAIN, OP_TYPE) in ops and ("", "MatMul") not in ops and ("", "Gemm") not in ops
    assert any(imp.domain == DOMAIN for imp in result.graph.proto.opset_import)
    feeds = random_feeds(pruned)
    dense = run(pruned, feeds)["y"]
    packed = ort_outputs(result.graph, feeds)["y"]
    assert compare(packed, dense).ok, compare(packed, dense).describe()
    reference = ReferenceEvaluator(result.graph.proto, new_ops=[Sparse24MatMul]).run(None, feeds)[0]
    assert np.array_equal(reference, packed)  # the same kernel, run by onnx.reference and by onnxruntime


@given(dense_graphs())
def test_packed_values_unpack_to_the_pruned_weight_and_second_run_changes_nothing(proto):
    pruned, result = pruned_and_packed(proto)
    node = next(n for n in result.graph.graph.node if n.op_type == OP_TYPE)
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.graph.initializer}
    w = numpy_helper.to_array(pruned.graph.initializer[0])
    gemm = pruned.graph.node[0]
    trans_b = any(a.name == "transB" and a.i == 1 for a in gemm.attribute)
    w_nk = w if trans_b else w.T
    back = unpack(inits[node.input[1]], inits[node.input[2]])
    assert np.array_equal(back.view(np.uint32), np.where(w_nk == 0, np.float32(0), w_nk).view(np.uint32))
    assert result.counts["pack-nm.packed-bytes"] < result.counts["pack-nm.dense-bytes"]
    snapshot = result.graph.proto.SerializeToString()
    assert not PackNM()(result.graph).changed
    assert result.graph.proto.SerializeToString() == snapshot


def test_skips_say_why():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((8, 4)).astype(np.float32)
    half = dense.astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "D"], ["y"], name="dense"),
         helper.make_node("MatMul", ["h", "H"], ["z"], name="half"),
         helper.make_node("Gemm", ["x", "S"], ["u"], name="scaled", alpha=2.0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "u")]
        + [helper.make_tensor_value_info("z", TensorProto.FLOAT16, None)],
        [numpy_helper.from_array(dense, "D"), numpy_helper.from_array(half, "H"),
         numpy_helper.from_array(np.zeros((8, 4), np.float32), "S")],
    )
    model = ogt.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = PackNM()(model)
    reasons = {s.node: s.reason for s in result.skipped}
    assert not result.changed
    assert "not 2:4 sparse" in reasons["dense"] and "run prune-nm first" in reasons["dense"]
    assert "not float32" in reasons["half"]
    assert "alpha != 1" in reasons["scaled"]


@pytest.mark.slow
def test_minilm_packed_runs_in_onnxruntime_like_the_pruned_model(minilm_l3_path):
    from models import data

    split = data.sentences(n_calib=2, n_eval=2)
    pruned = PruneNM()(ogt.load(minilm_l3_path)).graph
    result = PackNM()(pruned.copy())
    assert result.counts["pack-nm.matmul"] == 18
    saved = result.counts["pack-nm.dense-bytes"] - result.counts["pack-nm.packed-bytes"]
    assert pruned.weight_bytes() - result.graph.weight_bytes() == saved
    assert result.counts["pack-nm.packed-bytes"] < 0.54 * result.counts["pack-nm.dense-bytes"]
    feeds = dict(split.eval)
    dense, packed = run(pruned, feeds), ort_outputs(result.graph, feeds)
    for name, value in dense.items():
        assert compare(packed[name], value).ok, name
