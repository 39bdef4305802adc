"""Auto placement: data decides which op families stay float, but never at the cost of ORT's integer Conv."""

from __future__ import annotations

import numpy as np
import onnx

import ogt
from ogt.calib.data import iterable_source
from ogt.quant.quantize import QuantizeOptions, quantize

W = ", ".join(str(v) for v in np.round(np.random.default_rng(0).normal(0, 0.5, 16), 3))

CONV_RESIDUAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 3, 3] x) => (float[1, 4, 3, 3] y) <float[4, 4, 1, 1] w1 = {{{W}}}, float[4, 4, 1, 1] w2 = {{{W}}}> {{
    c = Conv (x, w1)
    r = Relu (c)
    a = Add (r, x)
    y = Conv (a, w2)
}}
"""

MATMUL_RESIDUAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 4] y) <float[4, 4] w1 = {{{W}}}, float[4, 4] w2 = {{{W}}}> {{
    m = MatMul (x, w1)
    a = Add (m, x)
    y = MatMul (a, w2)
}}
"""


def run_auto(text: str, shape: tuple[int, ...], target: str = "ort"):
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    model = ogt.Model(onnx.parser.parse_model(text))
    return quantize(model, iterable_source(batches), QuantizeOptions(target=target, progress=False))


def test_ort_never_drops_the_output_q_of_a_conv():
    result = run_auto(CONV_RESIDUAL, (1, 4, 3, 3))
    assert result.placement["fusion_critical"] == ["Add"]
    assert "without Add" not in result.placement["trials"]
    assert result.placement["kept_float"] == []


def test_matmul_residual_adds_are_tried_because_matmul_has_a_float_output_kernel():
    result = run_auto(MATMUL_RESIDUAL, (2, 4))
    assert result.placement["fusion_critical"] == []
    assert "without Add" in result.placement["trials"]
    kept = "Add" in result.placement["kept_float"]
    gain = result.placement["trials"]["without Add"] - result.placement["trials"]["full"]
    assert kept == (gain > 1.0)


def test_tensorrt_has_no_fusion_constraint_and_fixed_modes_skip_trials():
    result = run_auto(CONV_RESIDUAL, (1, 4, 3, 3), target="tensorrt")
    assert result.placement["fusion_critical"] == []
    rng = np.random.default_rng(1)
    model = ogt.Model(onnx.parser.parse_model(CONV_RESIDUAL))
    batches = [{"x": rng.standard_normal((1, 4, 3, 3)).astype(np.float32)}]
    full = quantize(model, iterable_source(batches), QuantizeOptions(placement="full", progress=False))
    assert full.placement == {"mode": "full", "kept_float": [], "trials": {}}


def test_switchable_trial_graph_equals_insertion_with_those_families_float():
    from ogt.calib.collect import calibrate
    from ogt.quant.insert_qdq import InsertQDQ
    from ogt.quant.quantize import switchable_qdq
    from ogt.testing import run

    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    model = ogt.Model(onnx.parser.parse_model(MATMUL_RESIDUAL))
    insert = InsertQDQ()
    table = calibrate(model, batches, tensors=insert.plan(model).tensors_to_calibrate(), progress=False)
    insert = InsertQDQ(table=table)
    trial, flags = switchable_qdq(model, insert, {"Add"})
    assert set(flags) == {"Add"}
    for keep_float in (False, True):
        expected = model.copy()
        InsertQDQ(table=table, keep_float_ops=("Add",) if keep_float else ())(expected)
        feeds = {**batches[0], flags["Add"]: np.asarray(not keep_float)}
        np.testing.assert_array_equal(run(trial, feeds)["y"], run(expected, batches[0])["y"])
