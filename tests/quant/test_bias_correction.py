"""Bias correction: after correct-bias the quantized-weight layer's mean output equals the float one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ogt
from ogt.calib.data import iterable_source
from ogt.graph.query import GraphIndex
from ogt.quant.bias_correction import ChannelMean, CorrectBias, output_shift
from ogt.quant.insert_qdq import InsertQDQ, quantize_weight
from ogt.quant.profiles import get_profile
from ogt.quant.quantize import QuantizeOptions, quantize
from ogt.testing import run


def _model(op: str, k: int, n: int, rng, *, bias: bool, trans_b: int = 0, group: int = 1) -> ogt.Model:
    x_shape = {"Conv": ["N", k, 3, 3], "Gemm": ["N", k], "MatMul": ["N", 5, k]}[op]
    if op == "Conv":
        w = rng.normal(0, 0.3, (n, k // group, 1, 1)).astype(np.float32)
    else:
        w = rng.normal(0, 0.3, (n, k) if trans_b and op == "Gemm" else (k, n)).astype(np.float32)
    b = rng.normal(0, 0.1, n).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w, "w")]
    if op == "MatMul":
        nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["m"])]
        if bias:
            inits.append(onnx.numpy_helper.from_array(b, "b"))
            nodes.append(onnx.helper.make_node("Add", ["m", "b"], ["y"]))
        else:
            nodes.append(onnx.helper.make_node("Relu", ["m"], ["y"]))
    else:
        ins = ["x", "w"] + (["b"] if bias else [])
        if bias:
            inits.append(onnx.numpy_helper.from_array(b, "b"))
        attrs = {"group": group} if op == "Conv" else {"transB": trans_b}
        nodes = [onnx.helper.make_node(op, ins, ["y"], **attrs)]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return ogt.Model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def _quantized_weights_only(model: ogt.Model, bits: int) -> ogt.Model:
    """The model with its weight replaced by DQ(Q(W)) as insert-qdq computes it (activations float)."""
    out = model.copy()
    idx = GraphIndex(out.graph)
    node = next(n for n in idx.nodes if n.op_type in ("Conv", "Gemm", "MatMul"))
    plan = InsertQDQ(weight_bits=bits).plan(out)
    (_, _, axis), = plan.weights
    t = idx.constant_storage(node.input[1])
    w = out.array(t)
    wq, scale = quantize_weight(w, axis, bits, get_profile("ort"))
    shape = [-1 if a == axis else 1 for a in range(w.ndim)]
    t.CopyFrom(onnx.numpy_helper.from_array((wq * scale.reshape(shape)).astype(np.float32), t.name))
    return out


@given(
    op=st.sampled_from(["Conv", "Gemm", "MatMul"]),
    k=st.sampled_from([4, 6, 8]),
    n=st.integers(1, 6),
    bias=st.booleans(),
    trans_b=st.integers(0, 1),
    grouped=st.booleans(),
    bits=st.sampled_from([3, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_corrected_mean_output_equals_float_on_the_data(op, k, n, bias, trans_b, grouped, bits, seed):
    rng = np.random.default_rng(seed)
    group = 2 if op == "Conv" and grouped else 1
    n = n * group
    model = _model(op, k, n, rng, bias=bias or op == "MatMul", trans_b=trans_b, group=group)
    x = (rng.normal(0.5, 1.0, {"Conv": (4, k, 3, 3), "Gemm": (6, k), "MatMul": (2, 5, k)}[op])).astype(np.float32)
    tap = ChannelMean(-1 if op == "MatMul" else 1)
    tap(x[:2])
    tap(x[2:])  # streaming in two batches
    insert = InsertQDQ(weight_bits=bits)
    corrected = model.copy()
    result = CorrectBias({"x": tap.mean}, insert)(corrected)
    assert result.counts.get("correct-bias.corrected") == 1
    y_float = run(model, {"x": x})["y"]
    y_quant = run(_quantized_weights_only(corrected, bits), {"x": x})["y"]
    axes = tuple(a for a in range(y_float.ndim) if a != (y_float.ndim - 1 if op != "Conv" else 1))
    np.testing.assert_allclose(y_quant.mean(axis=axes), y_float.mean(axis=axes), atol=2e-5, rtol=1e-4)
    # nothing stale left behind, and a second pass finds nothing more to correct in the bias it wrote
    names = {t.name for t in corrected.graph.initializer}
    assert "b" not in names or not bias


def test_output_shift_refuses_shapes_that_do_not_fit():
    assert output_shift("Conv", np.zeros((4, 2, 1, 1)), np.zeros(3), group=2) is None
    assert output_shift("Gemm", np.zeros((3, 4)), np.zeros(5)) is None
    assert output_shift("ConvTranspose", np.zeros((3, 4, 1, 1)), np.zeros(3)) is None


def test_matmul_without_bias_add_is_skipped_with_a_reason():
    rng = np.random.default_rng(0)
    model = _model("MatMul", 4, 3, rng, bias=False)
    result = CorrectBias({"x": np.ones(4)}, InsertQDQ())(model)
    assert not result.changed
    assert "bias Add" in result.skipped[0].reason


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_quantize_runs_bias_correction_and_leaves_no_unused_bias(demo_path, target):
    rng = np.random.default_rng(0)
    m = ogt.load(demo_path)
    name = m.graph.input[0].name
    batches = [{name: rng.normal(size=(4, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    result = quantize(m, iterable_source(batches), QuantizeOptions(target=target, progress=False, placement="full"))
    assert result.counts.get("correct-bias.corrected", 0) > 0
    idx = GraphIndex(m.graph)
    unread = [t.name for t in m.graph.initializer if not idx.consumers.get(t.name)]
    assert unread == []
    off = ogt.load(demo_path)
    plain = quantize(off, iterable_source(batches), QuantizeOptions(target=target, progress=False, bias_correction=False))
    assert "correct-bias.corrected" not in plain.counts


def test_matmul_biases_are_corrected_below_8_bit_weights_only():
    assert "MatMul" not in QuantizeOptions().corrected_ops()
    assert "MatMul" in QuantizeOptions(weight_bits=6).corrected_ops()
    assert QuantizeOptions(bias_correction_ops=("Conv",), weight_bits=4).corrected_ops() == ("Conv",)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(0.5, 1, (2, 5, 4)).astype(np.float32)} for _ in range(2)]
    for bits, expected in ((8, 0), (4, 1)):
        model = _model("MatMul", 4, 3, rng, bias=True)
        result = quantize(model, iterable_source(batches), QuantizeOptions(weight_bits=bits, progress=False))
        assert result.counts.get("correct-bias.corrected", 0) == expected
