"""insert-qdq on generated graphs: runs in onnxruntime, stays within the derived error bound."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ogt
from ogt.calib.table import CalibrationTable, TensorRange, graph_fingerprint
from ogt.errors import CalibrationError
from ogt.export.tensorrt_lint import lint_tensorrt
from ogt.graph.query import GraphIndex
from ogt.quant.insert_qdq import InsertQDQ, TensorOverride, quantize_weight
from ogt.quant.profiles import get_profile
from ogt.quant.profiles import WEIGHTED_OPS
from ogt.testing import random_feeds, run
from ogt.testing.strategies import bn_graphs


def minmax_table(model: ogt.Model, names: list[str], feeds: list[dict]) -> CalibrationTable:
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for f in feeds:
        out = run(model, f, names)
        for n in names:
            lo[n], hi[n] = min(lo[n], float(out[n].min())), max(hi[n], float(out[n].max()))
    ranges = {n: TensorRange(n, lo[n], hi[n], lo[n], hi[n], len(feeds)) for n in names}
    return CalibrationTable(graph_fingerprint(model), "minmax", len(feeds), ranges)


def folded(proto: onnx.ModelProto) -> ogt.Model:
    m = ogt.Model(copy.deepcopy(proto))
    ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(m)
    return m


def quantize(m: ogt.Model, target: str, bits: int = 8, **kw):
    feeds = [random_feeds(m, seed=s) for s in range(3)]
    plan = InsertQDQ(target=target, **kw).plan(m)
    table = minmax_table(m, plan.tensors_to_calibrate(), feeds)
    reference = m.copy()
    result = InsertQDQ(table=table, target=target, weight_bits=bits, act_bits=bits, **kw)(m)
    return reference, result, table, feeds


@given(bn_graphs(), st.sampled_from(["ort", "tensorrt"]), st.integers(4, 8))
def test_qdq_models_run_and_stay_within_the_derived_bound(g, target, bits):
    m = folded(g.model)
    reference, result, table, feeds = quantize(m, target, bits)
    qdq = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert result.counts.get("insert-qdq.activation", 0) == len(qdq)
    init_names = {t.name for t in m.graph.initializer}
    weights = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init_names]
    biases = result.counts.get("insert-qdq.bias", 0)
    assert result.counts.get("insert-qdq.weight", 0) >= 1
    # every float weight of a quantized layer is gone from the file
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in m.graph.initializer)
    # each activation Q/DQ pair: |x - DQ(Q(x))| <= scale/2 for x inside the calibrated range
    pairs = {}
    for q in qdq:
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        src = q.input[0]
        clip = next((n for n in m.graph.node if n.output[0] == src and n.op_type == "Clip"), None)
        pairs[clip.input[0] if clip else src] = (q, dq)
    names = list(pairs) + [dq.output[0] for _, dq in pairs.values()]
    out = run(m, feeds[0], names)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for x, (q, dq) in pairs.items():
        scale = float(inits[q.input[1]])
        lo, hi = table.range(x)
        inside = (out[x] >= lo) & (out[x] <= hi)
        err = np.abs(out[x] - out[dq.output[0]])
        assert np.all(err[inside] <= scale / 2 * (1 + 1e-4) + 1e-6), x
    if target == "tensorrt":
        assert lint_tensorrt(m) == []
    assert not InsertQDQ(table=table, target=target)(m).changed
    assert len(weights) == result.counts["insert-qdq.weight"] + biases


@given(bn_graphs())
def test_weights_are_per_channel_within_half_a_step(g):
    m = folded(g.model)
    idx = GraphIndex(m.graph)  # weights may be initializers or Constant nodes
    floats = {n.name: m.array(idx.constant_tensor(n.input[1])) for n in idx.nodes if n.op_type in WEIGHTED_OPS}
    quantize(m, "tensorrt")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        dq = next(n for n in m.graph.node if n.output[0] == node.input[1])
        wq, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert wq.dtype == np.int8 and np.all(np.abs(wq) <= 127)
        original = floats[node.name]
        if scale.size == 1:
            continue
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        shape = [1] * original.ndim
        shape[axis] = scale.size
        back = wq.astype(np.float64) * scale.reshape(shape)
        assert np.all(np.abs(back - original) <= scale.reshape(shape) / 2 * (1 + 1e-5) + 1e-7)


def _channel_errors(w: np.ndarray, axis: int, bits: int, method: str) -> np.ndarray:
    wq, scale = quantize_weight(w, axis, bits, get_profile("ort"), method)
    shape = [1] * w.ndim
    shape[axis] = -1
    back = wq.astype(np.float64) * scale.reshape(shape)
    return ((back - w) ** 2).sum(axis=tuple(a for a in range(w.ndim) if a != axis))


@given(
    st.integers(2, 6), st.integers(3, 40), st.sampled_from([4, 6, 8]), st.floats(0.0, 50.0), st.integers(0, 2**31 - 1)
)
def test_mse_weight_ranges_never_lose_to_minmax_per_channel(channels, k, bits, outlier, seed):
    """Ratio 1 is among the candidates, so each channel's error is at most minmax's; with a few
    large entries per channel at 4 bits it is strictly smaller somewhere."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, channels)).astype(np.float32)
    w[0] *= 1.0 + outlier  # one large row: every channel's extreme
    mse, minmax = _channel_errors(w, 1, bits, "mse"), _channel_errors(w, 1, bits, "minmax")
    assert np.all(mse <= minmax * (1 + 1e-9) + 1e-12)


def test_mse_weight_ranges_clip_heavy_tails_and_stay_on_the_grid():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(3, 512)).astype(np.float32)  # heavy tails: minmax spends the grid on a few entries
    wq, scale = quantize_weight(w, 0, 4, get_profile("ort"), "mse")
    assert np.all(np.abs(wq) <= 7) and np.all(scale < np.abs(w).max(axis=1) / 7)
    assert np.all(_channel_errors(w, 0, 4, "mse") < 0.8 * _channel_errors(w, 0, 4, "minmax"))
    with pytest.raises(ValueError, match="weight method"):
        quantize_weight(w, 0, 4, get_profile("ort"), "kl")
    with pytest.raises(ValueError, match="weight_method"):
        InsertQDQ(weight_method="kl")


def test_quantize_chooses_mse_weights_below_8_bits():
    from ogt.quant.quantize import QuantizeOptions

    assert QuantizeOptions(weight_bits=8).insert_qdq().weight_method == "minmax"
    assert QuantizeOptions(weight_bits=6).insert_qdq().weight_method == "mse"
    assert QuantizeOptions(weight_bits=4, weight_method="minmax").insert_qdq().weight_method == "minmax"


MASKED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x, float[2, 4] mask) => (float[2, 3] y) <float[4, 3] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}, float big = {-3.0e38}> {
    m = Mul (mask, big)
    h = Add (x, m)
    y = MatMul (h, w)
}
"""


def test_huge_ranges_stay_float_with_a_reason():
    m = ogt.Model(onnx.parser.parse_model(MASKED))
    feeds = [{"x": np.ones((2, 4), np.float32), "mask": np.eye(2, 4, dtype=np.float32)}]
    plan = InsertQDQ(target="ort").plan(m)
    table = minmax_table(m, plan.tensors_to_calibrate(), feeds)
    result = InsertQDQ(table=table, target="ort")(m)
    reasons = " | ".join(s.reason for s in result.skipped)
    assert "input 'm' range" in reasons and "exceeds" in reasons and "'h' range" in reasons


def test_excluded_nodes_and_recipe_overrides():
    m = folded(onnx.parser.parse_model(MASKED.replace("big = {-3.0e38}", "big = {-1.0}")))
    feeds = [{"x": np.ones((2, 4), np.float32), "mask": np.eye(2, 4, dtype=np.float32)}]
    table = minmax_table(m, InsertQDQ().plan(m).tensors_to_calibrate(), feeds)
    result = InsertQDQ(table=table, exclude=("MatMul",), overrides={"x": TensorOverride(skip=True)})(m.copy())
    assert "insert-qdq.weight" not in result.counts
    assert any("excluded by pattern 'MatMul'" in s.reason for s in result.skipped)
    assert any("kept float by the recipe" in s.reason for s in result.skipped)


def test_table_from_another_graph_is_refused(demo_path):
    m = folded(onnx.load(demo_path))
    other = ogt.Model(onnx.parser.parse_model(MASKED))
    table = minmax_table(other, ["x"], [{"x": np.ones((2, 4), np.float32), "mask": np.ones((2, 4), np.float32)}])
    with pytest.raises(CalibrationError, match="another graph"):
        InsertQDQ(table=table)(m)


def test_bits_are_validated():
    with pytest.raises(ValueError, match="2..8"):
        InsertQDQ(act_bits=9)
    with pytest.raises(ValueError, match="unknown target"):
        InsertQDQ(target="tpu")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_mobilenet_v2_quantizes_with_high_fidelity(mobilenet_v2_path, target):
    m = ogt.load(mobilenet_v2_path)
    ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(m)
    reference, result, table, feeds = quantize(m, target)
    assert result.counts["insert-qdq.weight"] == 53
    assert (result.counts.get("insert-qdq.bias", 0) == 53) == (target == "ort")
    a, b = run(reference, feeds[0]), run(m, feeds[0])
    ref, q = a["logits"].astype(np.float64), b["logits"].astype(np.float64)
    sqnr = 10 * np.log10((ref**2).sum() / ((ref - q) ** 2).sum())
    assert sqnr > 15  # random inputs, 3 calibration batches: int8 keeps the logits
    if target == "tensorrt":
        assert lint_tensorrt(m) == []


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (3, 2)])
def test_int4_storage_computes_what_restricted_int8_storage_computes(demo_path, target, bits):
    from ogt.calib.data import iterable_source
    from ogt.quant.quantize import QuantizeOptions, quantize as run_quantize

    rng = np.random.default_rng(0)
    m = ogt.load(demo_path)
    name = m.graph.input[0].name
    batches = [{name: rng.normal(size=(2, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    wb, ab = bits
    results = {}
    for int4 in (False, True):
        model = ogt.load(demo_path)
        opts = QuantizeOptions(target=target, weight_bits=wb, act_bits=ab, int4=int4, progress=False, placement="full")
        run_quantize(model, iterable_source(batches), opts)
        results[int4] = model
    four = results[True]
    assert four.opset("") == 21
    types = {t.data_type for t in four.graph.initializer}
    assert onnx.TensorProto.INT4 in types  # weights (and int8-target activations) in 4-bit storage
    if ab <= 4:
        act_type = onnx.TensorProto.INT4 if target == "tensorrt" else onnx.TensorProto.UINT4
        assert act_type in types
    feeds = {name: batches[0][name]}
    np.testing.assert_allclose(run(four, feeds)[four.graph.output[0].name],
                               run(results[False], feeds)[four.graph.output[0].name], rtol=1e-5, atol=1e-5)


def test_int4_refuses_an_old_opset_with_a_reason(demo_path):
    m = folded(ogt.load(demo_path).proto)
    table = minmax_table(m, InsertQDQ().plan(m).tensors_to_calibrate(), [random_feeds(m)])
    with pytest.raises(ogt.errors.TransformError, match="opset 21"):
        InsertQDQ(table=table, weight_bits=4, int4=True)(m)
