"""The ``ogt`` command line: transform (with report), transforms, inspect, --version."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import ogt
from ogt.cli.main import cli
from ogt.graph import io
from ogt.inspect import ModelSummary
from ogt.testing import assert_equivalent

DEMO_FOLD_COUNTS = {
    "fold-batchnorm.conv": 3,
    "fold-batchnorm.convtranspose": 1,
    "fold-batchnorm.gemm": 1,
    "fold-batchnorm.mul-add": 1,  # the BN after a Relu is lowered to Mul + Add
}
DEMO_CLEANUP_COUNTS = {
    "cleanup.dead-node": 1,
    "cleanup.identity": 1,
    "cleanup.unused-initializer": 25,
}


def invoke(*args):
    return CliRunner(env={"OGT_DEBUG": None}).invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def demo_copy(demo_path, tmp_path) -> Path:
    p = tmp_path / "tiny_cnn.onnx"
    shutil.copyfile(demo_path, p)
    return p


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in ogt.load(path).graph.node]


# --------------------------------------------------------------------------------------------
# ogt transform


def test_transform_fold_batchnorm_and_cleanup(demo_copy, demo_path, tmp_path):
    out, report = tmp_path / "folded.onnx", tmp_path / "r.json"
    result = invoke("transform", demo_copy, "-o", out, "-t", "fold-batchnorm", "-t", "cleanup", "--report", report)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"wrote {out}" in result.stdout
    assert "fold-batchnorm" in result.stdout and "conv=3" in result.stdout

    assert "BatchNormalization" not in _ops(out)
    assert "Identity" not in _ops(out)
    assert_equivalent(demo_path, out)
    assert demo_copy.read_bytes() == demo_path.read_bytes()  # input untouched

    rep = json.loads(report.read_text())
    assert rep["input"] == str(demo_copy) and rep["output"] == str(out)
    assert rep["transform"] == "pipeline" and rep["changed"] is True
    assert rep["counts"] == {**DEMO_FOLD_COUNTS, **DEMO_CLEANUP_COUNTS}
    assert rep["skipped"] == []
    assert isinstance(rep["seconds"], float) and rep["seconds"] >= 0
    steps = {s["transform"]: s for s in rep["steps"]}
    assert list(steps) == ["fold-batchnorm", "cleanup"]
    assert steps["fold-batchnorm"]["counts"] == DEMO_FOLD_COUNTS
    assert steps["cleanup"]["counts"] == DEMO_CLEANUP_COUNTS
    for s in steps.values():
        assert s["changed"] is True
        assert s["skipped"] == []
        assert isinstance(s["seconds"], float) and s["seconds"] >= 0


def test_transform_is_idempotent_on_its_output(demo_copy, tmp_path):
    once, twice, report = tmp_path / "once.onnx", tmp_path / "twice.onnx", tmp_path / "r2.json"
    assert invoke("transform", demo_copy, "-o", once, "-t", "fold-batchnorm", "-t", "cleanup").exit_code == 0
    result = invoke("transform", once, "-o", twice, "-t", "fold-batchnorm", "-t", "cleanup", "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["changed"] is False
    assert twice.read_bytes() == once.read_bytes()


def test_transform_default_output_name(demo_copy, demo_path):
    result = invoke("transform", demo_copy, "-t", "cleanup")
    assert result.exit_code == 0, result.output
    expected = demo_copy.with_name("tiny_cnn.transformed.onnx")
    assert expected.is_file()
    assert f"wrote {expected}" in result.stdout
    assert demo_copy.read_bytes() == demo_path.read_bytes()
    assert sorted(p.name for p in demo_copy.parent.iterdir()) == ["tiny_cnn.onnx", "tiny_cnn.transformed.onnx"]


def test_transform_external_input_writes_external_output(demo_path, tmp_path):
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    io.save(ogt.load(demo_path), src, external_data=True, size_threshold=256)
    out = tmp_path / "out" / "model.cleaned.onnx"
    out.parent.mkdir()
    result = invoke("transform", src, "-o", out, "-t", "cleanup")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.cleaned.onnx", "model.cleaned.onnx.data"]
    assert ogt.load(out).uses_external_data()
    assert_equivalent(demo_path, out)


def test_transform_no_external_data_flag_inlines(demo_path, tmp_path):
    src = tmp_path / "model.onnx"
    io.save(ogt.load(demo_path), src, external_data=True, size_threshold=256)
    out = tmp_path / "inline.onnx"
    result = invoke("transform", src, "-o", out, "-t", "cleanup", "--no-external-data")
    assert result.exit_code == 0, result.output
    assert not out.with_name("inline.onnx.data").exists()
    assert not ogt.load(out).uses_external_data()


def test_transform_unknown_name(demo_copy):
    result = invoke("transform", demo_copy, "-t", "fold-batchnorm", "-t", "bogus-transform")
    assert result.exit_code == 2  # usage error: click validates the name against the registry
    errs = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errs) == 1
    assert "bogus-transform" in errs[0]
    for name in ("cleanup", "fold-batchnorm", "fold-constants"):
        assert name in errs[0]  # the message lists what is available
    assert "Traceback" not in result.stderr
    assert not demo_copy.with_name("tiny_cnn.transformed.onnx").exists()


def test_transform_requires_a_transform(demo_copy):
    result = invoke("transform", demo_copy)
    assert result.exit_code == 2  # click usage error
    assert "--transform" in result.stderr


def test_transform_output_is_a_folder(demo_copy, tmp_path):
    result = invoke("transform", demo_copy, "-o", tmp_path, "-t", "cleanup")
    assert result.exit_code == ogt.errors.OutputError.exit_code
    assert "folder" in result.stderr


# --------------------------------------------------------------------------------------------
# ogt transforms


def test_transforms_lists_registered_names():
    result = invoke("transforms")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert {"fold-batchnorm", "cleanup", "fold-constants"} <= set(listed)
    assert listed == ogt.available()
    for line in result.stdout.splitlines():
        assert len(line.split()) > 1, f"no description: {line!r}"


# --------------------------------------------------------------------------------------------
# ogt inspect


def test_inspect_text(demo_path):
    result = invoke("inspect", demo_path)
    assert result.exit_code == 0, result.output
    text = result.stdout
    lines = text.splitlines()
    assert "ai.onnx 17" in next(line for line in lines if line.startswith("opsets"))
    assert "  image: float [N, 3, 32, 32]" in lines
    assert "  logits: float [N, 10]" in lines
    assert lines.index("inputs") < lines.index("  image: float [N, 3, 32, 32]") < lines.index("outputs")
    assert any(line.startswith("parameters") and "3,482" in line for line in lines)
    assert any(line.split() == ["BatchNormalization", "6"] for line in lines)
    assert any(line.startswith("Q/DQ pairs") and line.split()[-1] == "0" for line in lines)
    assert "external data       none" in lines
    hist = lines[lines.index("op histogram") + 1 :]
    assert dict((h.split()[0], int(h.split()[1])) for h in hist) == {
        "BatchNormalization": 6,
        "Conv": 3,
        "Relu": 3,
        "Identity": 1,
        "Constant": 1,
        "Sigmoid": 1,
        "ConvTranspose": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }


def test_inspect_json(demo_path):
    result = invoke("inspect", "--json", demo_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {f.name for f in dataclasses.fields(ModelSummary)}
    assert data["batchnorm"] == 6
    assert data["nodes"] == 19
    assert data["parameters"] == 3482
    assert data["opsets"] == {"ai.onnx": 17}
    assert data["inputs"] == [{"name": "image", "dtype": "float", "shape": ["N", 3, 32, 32]}]
    assert data["outputs"] == [{"name": "logits", "dtype": "float", "shape": ["N", 10]}]
    assert data["external_data"] is False and data["external_files"] == [] and data["external_bytes"] == 0
    assert data["path"] == str(demo_path.resolve())


def test_inspect_external_data(demo_path, tmp_path):
    p = tmp_path / "model.onnx"
    io.save(ogt.load(demo_path), p, external_data=True, size_threshold=256)
    text = invoke("inspect", p)
    assert text.exit_code == 0, text.output
    ext_line = next(line for line in text.stdout.splitlines() if line.startswith("external data"))
    assert "model.onnx.data" in ext_line and "none" not in ext_line
    data = json.loads(invoke("inspect", "--json", p).stdout)
    assert data["external_data"] is True
    assert data["external_files"] == ["model.onnx.data"]
    assert 0 < data["external_bytes"] <= data["parameter_bytes"]
    assert data["parameters"] == 3482  # same parameters wherever they are stored


def test_inspect_after_fold_shows_no_batchnorm(demo_copy, tmp_path):
    out = tmp_path / "folded.onnx"
    assert invoke("transform", demo_copy, "-o", out, "-t", "fold-batchnorm", "-t", "cleanup").exit_code == 0
    data = json.loads(invoke("inspect", "--json", out).stdout)
    assert data["batchnorm"] == 0
    assert "BatchNormalization" not in data["op_histogram"]


# --------------------------------------------------------------------------------------------
# ogt --version / --help


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ogt, version {ogt.__version__}"


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("transform", "transforms", "inspect"):
        assert cmd in result.stdout
