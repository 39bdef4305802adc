"""ogt prune and ogt inspect's sparsity report, end to end on a small MLP; errors exit with their codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ogt
from ogt.cli.main import cli
from ogt.kernels import OP_TYPE
from ogt.sparsity import sparsity_report


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 8)), ("W3", (8, 6)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["h2"], name="fc2"),
             helper.make_node("MatMul", ["h2", "W3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    path = tmp_path / "mlp.onnx"
    ogt.save(ogt.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), path)
    return path


def test_prune_magnitude_then_inspect(mlp, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = invoke("prune", mlp, "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    assert "prune-nm         matmul=3" in r.output
    steps = {s["transform"]: s for s in json.loads(report.read_text())["steps"]}
    assert steps["prune-nm"]["counts"]["prune-nm.zeroed"] == (16 * 32 + 32 * 8 + 8 * 6) // 2
    sparse = [w for w in sparsity_report(ogt.load(out)) if w.sparse]
    assert len(sparse) == 3
    r = invoke("inspect", out)
    assert "N:M sparsity        3/3 weights 2:4 sparse, 3 eligible for sparse kernels" in r.output
    r = invoke("inspect", "--json", out)
    assert [w["sparse"] for w in json.loads(r.output)["sparsity"]] == [True, True, True]


def test_prune_activation_on_synthetic_data_for_tensorrt_and_min_channels(mlp, tmp_path):
    out = tmp_path / "trt.onnx"
    r = invoke("prune", mlp, "-o", out, "--criterion", "activation", "--synthetic", "8", "--input-shape", "x:1x16",
               "--target", "tensorrt", "--min-channels", "8", "--exclude", "fc2")
    assert r.exit_code == 0, r.output
    assert "excluded by pattern 'fc2'" in r.output and "fewer than min_channels=8" in r.output
    ops = [n.op_type for n in ogt.load(out).graph.node]
    assert ops.count("Gemm") == 1 and ops.count("MatMul") == 2


def test_prune_and_pack(mlp, tmp_path):
    out = tmp_path / "packed.onnx"
    r = invoke("prune", mlp, "-o", out, "--pack")
    assert r.exit_code == 0, r.output
    assert [n.op_type for n in ogt.load(out).graph.node].count(OP_TYPE) == 3
    r = invoke("inspect", "--sparsity", out)
    assert r.output.count("packed 2:4") == 3


@pytest.mark.parametrize("args,code,words", [
    (["--criterion", "activation"], 2, "needs exactly one of --calib-data"),
    (["--synthetic", "4"], 2, "used only by --criterion activation"),
    (["--pack", "--target", "tensorrt"], 2, "TensorRT cannot run"),
    (["--n", "4", "--m", "4"], 2, "smaller than --m"),
    (["--criterion", "activation", "--calib-data", "{bad}"], 11, "error:"),
    (["-o", "{model}"], 9, "is the input model"),
])
def test_errors_exit_with_their_code_and_write_nothing(mlp, tmp_path, args, code, words):
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 16), np.float32))
    args = [a.format(bad=bad, model=mlp) for a in args]
    out = tmp_path / "never.onnx"
    r = invoke("prune", mlp, *(args if "-o" in args else [*args, "-o", out]))
    assert r.exit_code == code, r.output
    assert words in r.output
    assert not out.exists()
