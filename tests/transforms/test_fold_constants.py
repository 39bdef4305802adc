"""fold-constants: strict evaluation, failures reported, real models unchanged numerically."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import ogt
from ogt.testing import assert_equivalent, random_feeds


def fold(proto: onnx.ModelProto, **options) -> ogt.TransformResult:
    return ogt.FoldConstants(**options)(ogt.Model(copy.deepcopy(proto)))


def model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) <float[3, 2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> {
    wt = Transpose <perm = [1, 0]> (w)
    two = Constant <value = float {2.0}> ()
    w2 = Mul (wt, two)
    y = Add (x, w2)
}
"""


def test_constant_chain_folds_in_one_pass():
    result = fold(model(CHAIN))
    assert result.counts == {"fold-constants.node": 2}
    assert [n.op_type for n in result.graph.graph.node] == ["Constant", "Add"]
    assert_equivalent(model(CHAIN), result.graph)
    assert not ogt.FoldConstants()(result.graph).changed


BAD_RESHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[6] x) => (float[6] y) <float[6] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, int64[1] shape = {7}> {
    r = Reshape (w, shape)
    y = Add (x, r)
}
"""


def test_evaluation_failure_is_reported_not_swallowed():
    result = fold(model(BAD_RESHAPE))
    assert not result.changed
    (skip,) = result.skipped
    assert skip.op_type == "Reshape" and "reference evaluation failed" in skip.reason


def test_fail_on_error_raises():
    with pytest.raises(ogt.TransformError, match="cannot fold Reshape"):
        fold(model(BAD_RESHAPE), fail_on_error=True)


def test_large_outputs_are_left_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1000, 1000] x) => (float[1000, 1000] y) <float[1] one = {1.0}, int64[2] shape = {1000, 1000}> {
        big = Expand (one, shape)
        y = Add (x, big)
    }
    """
    result = fold(model(text), max_output_bytes=1000)
    assert not result.changed
    assert "max_output_bytes=1000" in result.skipped[0].reason


def test_random_ops_and_graph_inputs_are_not_folded():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        r = RandomUniform <shape = [2]> ()
        n = Neg (r)
        y = Add (x, n)
    }
    """
    result = fold(model(text))
    assert not result.changed and result.skipped == []


@given(st.lists(st.sampled_from(["Neg", "Abs", "Exp", "Sqrt", "Relu", "Transpose", "Sigmoid"]), min_size=1, max_size=6),
       st.integers(0, 2**31 - 1))
def test_generated_constant_chains_fold_to_the_same_values(ops, seed):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 2.0, (3, 3)).astype(np.float32)
    nodes, prev = [], "w"
    for k, op in enumerate(ops):
        nodes.append(helper.make_node(op, [prev], [f"c{k}"], name=f"n{k}"))
        prev = f"c{k}"
    nodes.append(helper.make_node("Add", ["x", prev], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = fold(proto)
    assert result.counts == {"fold-constants.node": len(ops)}
    assert [n.op_type for n in result.graph.graph.node] == ["Add"]
    assert_equivalent(proto, result.graph)


@pytest.mark.slow
def test_mobilenet_v2_is_unchanged_numerically(mobilenet_v2_path):
    m = ogt.load(mobilenet_v2_path)
    before = m.copy()
    result = ogt.Pipeline([ogt.FoldConstants(), ogt.FoldBatchNorm(), ogt.Cleanup()])(m)
    assert result.counts["fold-batchnorm.conv"] == 52
    assert not any(s.reason.startswith("reference evaluation failed") for s in result.skipped)
    assert_equivalent(before, m, random_feeds(before, dim_value=1))
