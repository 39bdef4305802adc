"""ogt.inspect.summarize on small text-format models."""

from __future__ import annotations

import re

import onnx
import onnx.parser
import pytest

import ogt
from ogt.graph import io, tensors
from ogt.graph.model import Model
from ogt.inspect import format_summary, summarize
from ogt.testing import assert_equivalent


def model(text: str) -> Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return Model(proto)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
PARAMS = "<float[4] gamma = {1.0, 2.0, 3.0, 4.0}, float[4] beta = {0.5, 0.0, -0.5, 1.0}>"

LN_OP = f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y) {PARAMS}
{{
  y = LayerNormalization <axis = -1, epsilon = 1e-5> (x, gamma, beta)
}}
"""

# the three spellings of the variance and the normalisation that exporters produce
SQUARE = {
    "pow": """
  two = Constant <value = float {2.0}> ()
  sq = Pow(d, two)""",
    "mul": """
  sq = Mul(d, d)""",
}
NORMALIZE = {
    "div": """
  n = Div(d, std)""",
    "reciprocal": """
  r = Reciprocal(std)
  n = Mul(d, r)""",
    "reciprocal-swapped": """
  r = Reciprocal(std)
  n = Mul(r, d)""",
}


def decomposed_ln(square: str, normalize: str, x: str = "x", prefix: str = "") -> str:
    """The body lines of one decomposed LayerNorm of ``x``, names prefixed with ``prefix``."""
    body = f"""
  mean = ReduceMean <axes = [-1]> ({x})
  d = Sub({x}, mean){SQUARE[square]}
  var = ReduceMean <axes = [-1]> (sq)
  eps = Constant <value = float {{1e-5}}> ()
  ve = Add(var, eps)
  std = Sqrt(ve){NORMALIZE[normalize]}
  s = Mul(n, gamma)
  ln = Add(s, beta)"""
    if not prefix:
        return body
    names = ["mean", "d", "two", "sq", "var", "eps", "ve", "std", "r", "n", "s", "ln"]
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: prefix + m.group(1), body)


def decomposed_model(square: str, normalize: str) -> str:
    return f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y) {PARAMS}
{{{decomposed_ln(square, normalize)}
  y = Identity(ln)
}}
"""


def test_layernorm_op_counted():
    s = summarize(model(LN_OP))
    assert s.layernorm_op == 1
    assert s.layernorm_decomposed == 0
    assert s.op_histogram == {"LayerNormalization": 1}


@pytest.mark.parametrize("square", sorted(SQUARE))
@pytest.mark.parametrize("normalize", sorted(NORMALIZE))
def test_decomposed_layernorm_counted_once(square, normalize):
    m = model(decomposed_model(square, normalize))
    s = summarize(m)
    assert s.layernorm_decomposed == 1
    assert s.layernorm_op == 0
    # the test model really is a LayerNorm
    assert_equivalent(model(LN_OP), m)


def test_two_decomposed_layernorms_counted_twice():
    text = f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y) {PARAMS}
{{{decomposed_ln("pow", "div", "x", "a_")}
  h = Relu(a_ln){decomposed_ln("mul", "reciprocal", "h", "b_")}
  y = Identity(b_ln)
}}
"""
    assert summarize(model(text)).layernorm_decomposed == 2


def test_layernorm_pieces_without_normalisation_not_counted():
    text = f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y) {{
  mean = ReduceMean <axes = [-1]> (x)
  d = Sub(x, mean)
  sq = Mul(d, d)
  var = ReduceMean <axes = [-1]> (sq)
  y = Sub(d, var)
}}
"""
    assert summarize(model(text)).layernorm_decomposed == 0


def test_sub_of_mean_of_another_tensor_not_counted():
    text = f"""
{HEADER}
g (float[2,4] x, float[2,4] z) => (float[2,4] y) {{
  mean = ReduceMean <axes = [-1]> (z)
  d = Sub(x, mean)
  sq = Mul(d, d)
  var = ReduceMean <axes = [-1]> (sq)
  eps = Constant <value = float {{1e-5}}> ()
  ve = Add(var, eps)
  std = Sqrt(ve)
  y = Div(d, std)
}}
"""
    assert summarize(model(text)).layernorm_decomposed == 0


def test_pow_with_other_exponent_not_counted():
    text = decomposed_model("pow", "div").replace("float {2.0}", "float {3.0}")
    assert summarize(model(text)).layernorm_decomposed == 0


QDQ = f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y)
<float s = {{0.1}}, uint8 zp = {{128}}>
{{
  q = QuantizeLinear(x, s, zp)
  y = DequantizeLinear(q, s, zp)
}}
"""


def test_qdq_pair_counted():
    s = summarize(model(QDQ))
    assert s.qdq_pairs == 1
    assert s.op_histogram == {"QuantizeLinear": 1, "DequantizeLinear": 1}


def test_qdq_chain_and_fanout():
    text = f"""
{HEADER}
g (float[2,4] x) => (float[2,4] y, float[2,4] z)
<float s = {{0.1}}, uint8 zp = {{128}}, uint8[2,4] wq = {{1, 2, 3, 4, 5, 6, 7, 8}}>
{{
  q1 = QuantizeLinear(x, s, zp)
  d1 = DequantizeLinear(q1, s, zp)
  r = Relu(d1)
  q2 = QuantizeLinear(r, s, zp)
  a = DequantizeLinear(q2, s, zp)
  b = DequantizeLinear(q2, s, zp)
  w = DequantizeLinear(wq, s, zp)
  y = Add(a, w)
  z = Mul(b, w)
}}
"""
    # q1->d1, q2->a, q2->b; the weight-only DequantizeLinear has no QuantizeLinear in front
    assert summarize(model(text)).qdq_pairs == 3


def test_quantize_without_dequantize_not_a_pair():
    text = f"""
{HEADER}
g (float[2,4] x) => (uint8[2,4] y)
<float s = {{0.1}}, uint8 zp = {{128}}>
{{
  y = QuantizeLinear(x, s, zp)
}}
"""
    assert summarize(model(text)).qdq_pairs == 0


PARAM_MODEL = f"""
{HEADER}
g (float[2,3] x) => (float[2,4] y)
<float[3,4] w = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}}, int64[2] shape = {{2, 4}}>
{{
  b = Constant <value = float[4] {{0.0, 1.0, 2.0, 3.0}}> ()
  m = MatMul(x, w)
  a = Add(m, b)
  y = Reshape(a, shape)
}}
"""


def test_parameter_count_and_bytes():
    s = summarize(model(PARAM_MODEL))
    assert s.parameters == 12 + 2 + 4  # initializers and Constant-node tensors
    assert s.parameter_bytes == 12 * 4 + 2 * 8 + 4 * 4
    assert s.nodes == 4
    assert [(i.name, i.dtype, i.shape) for i in s.inputs] == [("x", "float", [2, 3])]
    assert [(o.name, o.dtype, o.shape) for o in s.outputs] == [("y", "float", [2, 4])]
    assert s.external_data is False and s.external_files == [] and s.external_bytes == 0
    assert s.path is None


def test_initializer_declared_as_input_is_not_listed_as_input():
    text = """
<ir_version: 3, opset_import: ["" : 11]>
g (float[2,3] x, float[3,4] w) => (float[2,4] y)
<float[3,4] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}>
{
  y = MatMul(x, w)
}
"""
    s = summarize(model(text))
    assert [i.name for i in s.inputs] == ["x"]
    assert s.parameters == 12


def test_symbolic_dims_and_custom_domain():
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N, 3] x) => (float[N, 3] y) {
  h = com.example.Mystery(x)
  y = Relu(h)
}
"""
    proto = onnx.parser.parse_model(text)  # no checker: the custom op has no schema
    s = summarize(Model(proto))
    assert s.inputs[0].shape == ["N", 3]
    assert s.opsets == {"ai.onnx": 17, "com.example": 1}
    assert s.op_histogram == {"com.example.Mystery": 1, "Relu": 1}


def test_external_data_fields(tmp_path):
    inline = model(PARAM_MODEL)
    path = tmp_path / "m.onnx"
    io.save(inline.copy(), path, external_data=True, size_threshold=20)  # w (48 bytes) external; others inline
    loaded = ogt.load(path)
    s = summarize(loaded)
    assert s.external_data is True
    assert s.external_files == ["m.onnx.data"]
    external = [t for t in loaded.iter_tensors() if tensors.is_external(t)]
    assert sorted(t.name for t in external) == ["w"]
    assert s.external_bytes == 48
    assert (s.parameters, s.parameter_bytes) == (summarize(inline).parameters, summarize(inline).parameter_bytes)
    assert s.path == str(path.resolve())
    text = format_summary(s)
    assert "external data       48 B in m.onnx.data" in text.splitlines()


def test_format_summary_mentions_everything():
    s = summarize(model(QDQ))
    text = format_summary(s)
    lines = text.splitlines()
    assert "model        (in memory)" in lines
    assert "opsets       ai.onnx 17" in lines
    assert "  x: float [2, 4]" in lines
    assert "Q/DQ pairs          1" in lines
    assert "LayerNorm           0 op, 0 decomposed" in lines
    assert "external data       none" in lines
