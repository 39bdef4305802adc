"""ogt quantize end to end on the bundled model; bad calibration data fails clearly, writes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import ogt
from ogt.calib.table import CalibrationTable
from ogt.cli.main import cli
from ogt.errors import CalibrationError
from ogt.export.tensorrt_lint import lint_tensorrt
from ogt.testing import random_feeds, run


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def demo(tmp_path, demo_path):
    p = tmp_path / "demo.onnx"
    shutil.copy(demo_path, p)
    return p


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, image=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    return p


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_quantize_writes_a_faithful_qdq_model(demo, calib, tmp_path, target, method):
    out, report, table = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "t.json"
    res = invoke("quantize", demo, "-o", out, "--calib-data", calib, "--method", method, "--target", target,
                 "--report", report, "--save-table", table, "--quiet")
    assert res.exit_code == 0, res.output + res.stderr
    q = ogt.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") >= 5
    rep = json.loads(report.read_text())
    assert rep["counts"]["insert-qdq.weight"] == 5 and rep["calibration_samples"] == 16
    assert len(rep["layers"]) == 5 and all(np.isfinite(x["sqnr_db"]) for x in rep["layers"])
    assert rep["outputs"][0]["cosine_mean"] > 0.99
    assert all("scale" in v for v in rep["scales"].values())
    CalibrationTable.load(table)  # round-trips
    feeds = random_feeds(q, seed=5)
    a = run(ogt.load(demo), feeds)["logits"]
    b = run(q, feeds)["logits"]
    cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.99
    assert (lint_tensorrt(q) == []) == (target == "tensorrt")


def test_default_batching_computes_the_same_table_as_one_sample_per_run(demo, calib, tmp_path):
    tables = {}
    for label, extra in (("auto", []), ("one", ["--batch-size", "1"])):
        table = tmp_path / f"{label}.json"
        res = invoke("quantize", demo, "-o", tmp_path / f"{label}.onnx", "--calib-data", calib, "--method", "percentile",
                     "--save-table", table, "--quiet", *extra)
        assert res.exit_code == 0, res.output + res.stderr
        tables[label] = CalibrationTable.load(table)
    auto, one = tables["auto"], tables["one"]
    assert sorted(auto.ranges) == sorted(one.ranges) and auto.samples == one.samples == 16
    for name in one.ranges:
        np.testing.assert_allclose(auto.range(name), one.range(name), rtol=1e-6, atol=1e-7)


def test_default_output_is_beside_the_input_and_summary_is_printed(demo):
    res = invoke("quantize", demo, "--synthetic", "8", "--input-shape", "image:1x3x32x32")
    assert res.exit_code == 0, res.output + res.stderr
    assert demo.with_name("demo.quant.onnx").exists()
    assert "quantized 5 weighted layers" in res.output
    assert "worst layers by SQNR" in res.output and "fidelity on calibration data" in res.output


def test_bits_and_recipe(demo, calib, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"tensors": {"image": {"skip": True}}}))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    res = invoke("quantize", demo, "-o", out, "--calib-data", calib, "--weight-bits", "4", "--act-bits", "6",
                 "--recipe", recipe, "--report", report, "--quiet")
    assert res.exit_code == 0, res.output + res.stderr
    rep = json.loads(report.read_text())
    assert rep["weight_bits"] == 4 and rep["act_bits"] == 6
    assert any("kept float by the recipe" in s["reason"] for s in rep["skipped"])
    assert "Clip" in [n.op_type for n in ogt.load(out).graph.node]


def _bad(tmp_path, name, **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize(
    "arrays,needle",
    [
        ({"pixels": np.zeros((2, 3, 32, 32), np.float32)}, "pixels"),
        ({"image": np.zeros((2, 3, 16, 16), np.float32)}, "image"),
        ({"image": np.zeros((2, 3, 32, 32), np.float64)}, "image"),
        ({}, "calib"),
    ],
    ids=["wrong-name", "wrong-shape", "wrong-dtype", "empty"],
)
def test_bad_calibration_data_fails_clearly_without_output(demo, tmp_path, arrays, needle):
    data = _bad(tmp_path, "calib.npz", **arrays)
    out = tmp_path / "q.onnx"
    res = invoke("quantize", demo, "-o", out, "--calib-data", data, "--quiet")
    assert res.exit_code == CalibrationError.exit_code
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "demo.onnx"]


def test_empty_file_and_missing_data(demo, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    res = invoke("quantize", demo, "-o", tmp_path / "q.onnx", "--calib-data", empty)
    assert res.exit_code == CalibrationError.exit_code and "empty.npz" in res.stderr
    res = invoke("quantize", demo, "-o", tmp_path / "q.onnx", "--calib-data", tmp_path / "nope.npz")
    assert res.exit_code == CalibrationError.exit_code and "nope.npz" in res.stderr
    res = invoke("quantize", demo)
    assert res.exit_code == 2 and "--calib-data" in res.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_never_writes_over_the_input(demo, calib):
    res = invoke("quantize", demo, "-o", demo, "--calib-data", calib)
    assert res.exit_code == 9 and "--overwrite" in res.stderr


def test_cli_calibration_switches(tmp_path, demo_path):
    from click.testing import CliRunner

    from ogt.cli.main import cli

    out = tmp_path / "q.onnx"
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(demo_path), "-o", str(out), "--synthetic", "8", "--batch-size", "4",
                              "--method", "entropy", "--coverage", "0.99", "--no-bias-correction", "--refine"])
    assert res.exit_code == 0, res.output
    assert "bias correction" not in res.output and "refine:" in res.output
    res = runner.invoke(cli, ["quantize", str(demo_path), "-o", str(tmp_path / "x.onnx"), "--synthetic", "8",
                              "--method", "minmax", "--coverage", "0.99"])
    assert res.exit_code == 2 and "--coverage applies to --method entropy" in res.output
    assert not (tmp_path / "x.onnx").exists()
