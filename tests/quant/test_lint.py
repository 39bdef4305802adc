"""ogt lint --target tensorrt: accepts a clean QDQ model, names each hand-made violation."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner

import ogt
from ogt.cli.main import cli
from ogt.errors import LintError
from ogt.export.tensorrt_lint import lint_tensorrt

GOOD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 4, 4] x, float[1, 2, 4, 4] r) => (float[1, 4, 4, 4] y) <
    int8[2, 2, 1, 1] wq = {1, 2, 3, 4}, float[2] ws = {0.1, 0.2}, int8[2] wz = {0, 0},
    float s = {0.05}, int8 z = {0}
> {
    xq = QuantizeLinear (x, s, z)
    xd = DequantizeLinear (xq, s, z)
    wd = DequantizeLinear <axis = 0> (wq, ws, wz)
    c = Conv (xd, wd)
    cq = QuantizeLinear (c, s, z)
    cd = DequantizeLinear (cq, s, z)
    rq = QuantizeLinear (r, s, z)
    rd = DequantizeLinear (rq, s, z)
    a = Add (cd, rd)
    aq = QuantizeLinear (a, s, z)
    ad = DequantizeLinear (aq, s, z)
    y = Concat <axis = 1> (ad, rd)
}
"""


def lint(text: str):
    return lint_tensorrt(ogt.Model(onnx.parser.parse_model(text)))


def rules(text: str) -> set[str]:
    return {v.rule for v in lint(text)}


def test_clean_model_passes():
    assert lint(GOOD) == []


@pytest.mark.parametrize(
    "old,new,rule",
    [
        ("int8 z = {0}", "uint8 z = {128}", "zero-point"),
        ("int8 z = {0}", "uint8 z = {0}", "dtype"),
        ("wd = DequantizeLinear <axis = 0> (wq, ws, wz)", "wd = DequantizeLinear <axis = 1> (wq, ws, wz)", "weight-axis"),
        ("    a = Add (cd, rd)", "    a = Add (c, rd)", "residual-add"),
        ("    y = Concat <axis = 1> (ad, rd)", "    y = Concat <axis = 1> (ad, r)", "concat-scale"),
    ],
)
def test_each_violation_is_named(old, new, rule):
    bad = GOOD.replace(old, new)
    assert bad != GOOD
    found = lint(bad)
    assert rule in {v.rule for v in found}
    assert all(v.node and v.message for v in found)


def test_int32_bias_dynamic_quant_per_channel_activation_and_float_only_consumer():
    text = GOOD.replace(
        "    y = Concat <axis = 1> (ad, rd)",
        """    bd = DequantizeLinear <axis = 0> (bq, bs, bz)
    dq8, ds, dz = DynamicQuantizeLinear (x)
    pd = DequantizeLinear <axis = 1> (xq2, ws, wz)
    sm = Softmax (ad)
    y = Concat <axis = 1> (ad, rd)""",
    ).replace(
        "float s = {0.05}",
        "float s = {0.05}, int32[2] bq = {10, 20}, float[2] bs = {0.01, 0.01}, int32[2] bz = {0, 0}, int8[1, 2, 4, 4] xq2 = {"
        + ", ".join(["1"] * 32)
        + "}",
    )
    text = text.replace("    sm = Softmax (ad)", "    sm = Softmax (ad)\n    pc = Relu (pd)")
    found = rules(text)
    assert {"int32", "dynamic"} <= found


def test_concat_with_two_scales_is_flagged():
    text = GOOD.replace("rq = QuantizeLinear (r, s, z)\n    rd = DequantizeLinear (rq, s, z)",
                        "rq = QuantizeLinear (r, s2, z)\n    rd = DequantizeLinear (rq, s2, z)")
    text = text.replace("float s = {0.05}", "float s = {0.05}, float s2 = {0.07}")
    assert "concat-scale" in rules(text)


def test_dq_feeding_softmax_cannot_fuse():
    text = GOOD.replace("    y = Concat <axis = 1> (ad, rd)", "    y = Softmax <axis = 1> (ad)").replace(
        "float[1, 4, 4, 4] y", "float[1, 2, 4, 4] y"
    )
    assert "no-fusion" in rules(text)


def test_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(onnx.parser.parse_model(GOOD), good)
    onnx.save(onnx.parser.parse_model(GOOD.replace("int8 z = {0}", "uint8 z = {128}")), bad)
    runner = CliRunner()
    ok = runner.invoke(cli, ["lint", "--target", "tensorrt", str(good)])
    assert ok.exit_code == 0 and "no violations" in ok.output
    res = runner.invoke(cli, ["lint", "--target", "tensorrt", str(bad)])
    assert res.exit_code == LintError.exit_code
    assert "zero-point" in res.output and "xq" in res.output
    js = runner.invoke(cli, ["lint", "--target", "tensorrt", "--json", str(bad)])
    assert js.exit_code == LintError.exit_code and '"rule": "zero-point"' in js.output
