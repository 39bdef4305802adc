"""The LayerNorm matcher shared by inspect, migrate-gamma and smoothquant."""

from __future__ import annotations

import onnx
import pytest

from ogt.graph.patterns import layernorms
from ogt.graph.query import GraphIndex


def match(text: str):
    m = onnx.parser.parse_model(text)
    idx = GraphIndex(m.graph)
    return idx, layernorms(idx)


OPSET18 = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[2, 4] x) => (float[2, 4] y) <
    int64[1] axes = {-1}, float two = {2.0}, float eps = {1e-5}, float[4] gamma = {1., 2., 3., 4.}, float[4] beta = {0., 1., 0., 1.}
> {
    mean = ReduceMean(x, axes)
    d = Sub(x, mean)
    sq = Pow(d, two)
    var = ReduceMean(sq, axes)
    ve = Add(var, eps)
    std = Sqrt(ve)
    n = Div(d, std)
    s = Mul(gamma, n)
    y = Add(beta, s)
}
"""


def test_axes_as_input_eps_initializer_operands_swapped():
    idx, (ln,) = match(OPSET18)
    assert ln.kind == "decomposed" and ln.x == "x" and ln.output == "y"
    assert ln.axes == (-1,) and ln.epsilon == pytest.approx(1e-5)
    assert (ln.gamma, ln.beta, ln.normalized) == ("gamma", "beta", "n")
    assert len(ln.nodes) == 9
    assert ln.over_last_axis(2)


def test_tail_stops_where_a_tensor_has_another_reader():
    text = OPSET18.replace("float[2, 4] y)", "float[2, 4] y, float[2, 4] s)")
    _, (ln,) = match(text)
    assert ln.output == "s" and ln.beta is None and ln.gamma == "gamma"


def test_pow_of_three_is_not_a_variance():
    _, found = match(OPSET18.replace("float two = {2.0}", "float two = {3.0}"))
    assert found == []


def test_different_axes_in_the_two_means_is_not_a_layernorm():
    text = OPSET18.replace("var = ReduceMean(sq, axes)", "var = ReduceMean(sq, axes0)").replace(
        "int64[1] axes = {-1},", "int64[1] axes = {-1}, int64[1] axes0 = {0},"
    )
    _, found = match(text)
    assert found == []


def test_op_form_and_axis():
    _, (ln,) = match("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] x) => (float[2, 3, 4] y) <float[3, 4] gamma = {1., 2., 3., 4., 1., 2., 3., 4., 1., 2., 3., 4.}> {
    y = LayerNormalization <axis = -2> (x, gamma)
}
""")
    assert ln.kind == "op" and ln.gamma == "gamma" and ln.beta is None
    assert not ln.over_last_axis(3)
