"""Bad input: one clear message, a distinct exit code, no traceback unless --debug, no half-written output.

Every case goes through the API (``ogt.load`` raises the specific ogt.errors class) and through the
CLI (exit code = the class's ``exit_code``, one ``error:`` line on stderr naming the problem).
Small models are written in ONNX text format; broken ones are serialized without the checker.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import ogt
from ogt import errors
from ogt.cli.main import cli
from ogt.graph import io
from ogt.testing import assert_equivalent

# --------------------------------------------------------------------------------------------
# helpers


def _write(path: Path, model: onnx.ModelProto | str) -> Path:
    if isinstance(model, str):
        model = onnx.parser.parse_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _external_model(folder: Path, location: str, *, file_bytes: int | None = 32, offset: int = 0, length: int = 32) -> Path:
    """``y = Add(x, w)`` with w (float[8], 32 bytes) stored as external data at ``location``."""
    w = TensorProto()
    w.name = "w_ext"
    w.data_type = TensorProto.FLOAT
    w.dims.append(8)
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = w.external_data.add()
        e.key, e.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w_ext"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if file_bytes is not None:
        (folder / "w.bin").write_bytes(np.arange(file_bytes // 4, dtype=np.float32).tobytes())
    return _write(folder / "ext.onnx", model)


def _assert_one_error_line(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errs = [line for line in lines if line.startswith("error:")]
    assert len(errs) == 1, f"expected exactly one 'error:' line, stderr was:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert lines == errs, f"unexpected extra stderr output:\n{stderr}"
    for needle in needles:
        assert needle in errs[0], f"{needle!r} not named in: {errs[0]}"
    return errs[0]


def invoke(*args: str):
    return CliRunner(env={"OGT_DEBUG": None}).invoke(cli, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# the cases


@dataclasses.dataclass
class Case:
    make: Callable[[Path], Path]
    error: type[errors.OgtError]
    names: tuple[str, ...] = ()  # what the message must name (file, tensor, node, ...)


VALID_TXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
  y = Relu(x)
}
"""


def _demo_bytes() -> bytes:
    return (Path(__file__).resolve().parents[1] / "models" / "demo" / "tiny_cnn.onnx").read_bytes()


def _make_dir(tmp: Path) -> Path:
    d = tmp / "a_folder.onnx"
    d.mkdir()
    return d


def _make_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(data)
        return p

    return make


def _graph_tag_offset(model: onnx.ModelProto) -> int:
    """Byte offset of the ModelProto.graph field tag (fields are serialized in field-number order)."""
    head = onnx.ModelProto()
    head.CopyFrom(model)
    for field in ("graph", "opset_import", "metadata_props", "training_info", "functions"):
        head.ClearField(field)
    return len(head.SerializeToString())


def _make_corrupt_structure(tmp: Path) -> Path:
    data = bytearray(_demo_bytes())
    at = _graph_tag_offset(onnx.load_from_string(bytes(data)))
    assert data[at] == (7 << 3) | 2  # graph: field 7, length-delimited
    data[at + 1 : at + 11] = b"\xff" * 10  # a varint longer than protobuf allows
    p = tmp / "corrupt.onnx"
    p.write_bytes(bytes(data))
    return p


def _text_case(name: str, text: str) -> Callable[[Path], Path]:
    return lambda tmp: _write(tmp / f"{name}.onnx", text)


CASES: dict[str, Case] = {
    "missing-file": Case(lambda tmp: tmp / "missing.onnx", errors.InputNotFoundError, ("missing.onnx", "no such file")),
    "directory": Case(_make_dir, errors.InputNotFoundError, ("a_folder.onnx",)),
    "empty-file": Case(_make_bytes("empty.onnx", b""), errors.InvalidModelError, ("empty.onnx", "empty")),
    "text-file": Case(
        _make_bytes("notes.onnx", b"this is a text file, not a protobuf\n" * 20), errors.InvalidModelError, ("notes.onnx",)
    ),
    "random-bytes": Case(
        _make_bytes("random.onnx", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        errors.InvalidModelError,
        ("random.onnx",),
    ),
    "corrupt-structure": Case(_make_corrupt_structure, errors.InvalidModelError, ("corrupt.onnx",)),
    "external-missing": Case(
        lambda tmp: _external_model(tmp, "w.bin", file_bytes=None), errors.ExternalDataError, ("w_ext", "w.bin")
    ),
    "external-truncated": Case(
        lambda tmp: _external_model(tmp, "w.bin", file_bytes=16), errors.ExternalDataError, ("w_ext", "w.bin")
    ),
    "external-offset-past-end": Case(
        lambda tmp: _external_model(tmp, "w.bin", file_bytes=32, offset=8), errors.ExternalDataError, ("w_ext",)
    ),
    "external-escapes-folder": Case(
        lambda tmp: _external_model(tmp, "../../x.bin", file_bytes=None), errors.UnsafeModelError, ("w_ext", "../../x.bin")
    ),
    "external-absolute-path": Case(
        lambda tmp: _external_model(tmp, str(tmp / "w.bin"), file_bytes=32), errors.UnsafeModelError, ("w_ext", "absolute")
    ),
    "dangling-node-input": Case(
        _text_case(
            "dangling",
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) {
              [relu_node] y = Relu(ghost)
            }
            """,
        ),
        errors.InvalidGraphError,
        ("ghost", "relu_node"),
    ),
    "dangling-graph-output": Case(
        _text_case(
            "dangling_out",
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y, float[2] phantom) {
              y = Relu(x)
            }
            """,
        ),
        errors.InvalidGraphError,
        ("phantom",),
    ),
    "cycle": Case(
        _text_case(
            "cycle",
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) {
              [first] a = Add(x, b)
              [second] b = Relu(a)
              y = Neg(a)
            }
            """,
        ),
        errors.InvalidGraphError,
        ("cycle", "first", "second"),
    ),
    "duplicate-producer": Case(
        _text_case(
            "dup",
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) {
              [one] y = Relu(x)
              [two] y = Neg(x)
            }
            """,
        ),
        errors.InvalidGraphError,
        ("'y'", "two"),
    ),
    "unknown-opset": Case(
        _text_case("opset999", VALID_TXT.replace('"" : 17', '"" : 999')), errors.UnsupportedModelError, ("999",)
    ),
    "ir-version-too-new": Case(
        _text_case("ir99", VALID_TXT.replace("ir_version: 8", f"ir_version: {onnx.IR_VERSION + 1}")),
        errors.UnsupportedModelError,
        (f"IR version {onnx.IR_VERSION + 1}",),
    ),
    "undeclared-domain": Case(
        _text_case(
            "domain",
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) {
              y = com.example.Mystery(x)
            }
            """,
        ),
        errors.UnsupportedModelError,
        ("com.example",),
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    c = CASES[request.param]
    return c, c.make(tmp_path)


def test_api_raises_specific_error(case):
    c, path = case
    with pytest.raises(errors.OgtError) as ei:
        ogt.load(path)
    assert type(ei.value) is c.error, f"{type(ei.value).__name__}: {ei.value}"
    for needle in c.names:
        assert needle in str(ei.value)


def test_cli_inspect_one_error_line_and_exit_code(case):
    c, path = case
    result = invoke("inspect", path)
    assert result.exit_code == c.error.exit_code, result.output
    _assert_one_error_line(result.stderr, *c.names)
    assert result.stdout == ""


def test_cli_transform_exit_code_and_no_output(case, tmp_path):
    c, path = case
    out = tmp_path / "out_dir" / "out.onnx"
    out.parent.mkdir()
    result = invoke("transform", path, "-o", out, "-t", "cleanup")
    assert result.exit_code == c.error.exit_code, result.output
    _assert_one_error_line(result.stderr, *c.names)
    assert list(out.parent.iterdir()) == []


def test_cli_debug_shows_traceback(case):
    c, path = case
    result = invoke("--debug", "inspect", path)
    assert result.exit_code == c.error.exit_code
    assert "Traceback" in result.stderr
    assert c.error.__name__ in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error:")


# --------------------------------------------------------------------------------------------
# the distinct exit codes really are distinct


def test_exit_codes_distinct():
    classes = [
        errors.InputNotFoundError,
        errors.InvalidModelError,
        errors.InvalidGraphError,
        errors.UnsupportedModelError,
        errors.ExternalDataError,
        errors.UnsafeModelError,
        errors.OutputError,
        errors.TransformError,
        errors.CalibrationError,
    ]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes)
    assert all(c not in (0, 1, 2, 70) for c in codes)  # 1: generic, 2: click usage, 70: internal


# --------------------------------------------------------------------------------------------
# truncated / corrupted demo bytes

CUTS = (1, 2, 10, 100, 1000, 4000, 8000, 12000, 16000, -100, -10, -1)


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_demo_rejected(tmp_path, cut):
    data = _demo_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[:cut])
    with pytest.raises(errors.InvalidModelError) as ei:  # any subclass: some cuts may parse, then fail validation
        ogt.load(p)
    result = invoke("inspect", p)
    assert result.exit_code == type(ei.value).exit_code
    _assert_one_error_line(result.stderr, "trunc.onnx" if type(ei.value) is errors.InvalidModelError else "")


def test_corruption_anywhere_never_escapes_as_raw_exception(tmp_path):
    """Overwrite 8 bytes at many offsets: either the model still loads (data bytes changed, which no
    format can detect) or ogt raises an InvalidModelError subclass; never another exception."""
    data = _demo_bytes()
    p = tmp_path / "c.onnx"
    rejected = 0
    for pos in range(0, len(data) - 8, 97):
        b = bytearray(data)
        b[pos : pos + 8] = b"\xff" * 8
        p.write_bytes(bytes(b))
        try:
            ogt.load(p)
        except errors.InvalidModelError:
            rejected += 1
    assert rejected > 0


# --------------------------------------------------------------------------------------------
# through the real executable: nothing but one line reaches the terminal


def _ogt_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("ogt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ogt"]


@pytest.mark.parametrize("name", ["corrupt-structure", "external-escapes-folder"])
def test_subprocess_no_traceback(tmp_path, name):
    c = CASES[name]
    path = c.make(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "OGT_DEBUG"}
    proc = subprocess.run([*_ogt_cmd(), "transform", str(path), "-t", "cleanup"], capture_output=True, text=True, env=env)
    assert proc.returncode == c.error.exit_code, proc.stderr
    _assert_one_error_line(proc.stderr, *c.names)
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if "transformed" in p.name) == []

    proc = subprocess.run([*_ogt_cmd(), "--debug", "inspect", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == c.error.exit_code
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error:")


# --------------------------------------------------------------------------------------------
# inputs the validator should reject but does not (ogt bugs; see the reasons)


def _mk(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _f(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])


def test_node_output_shadowing_graph_input_rejected(tmp_path):
    p = _write(tmp_path / "shadow.onnx", _mk([helper.make_node("Relu", ["x"], ["x"], name="r")], [_f("x")], [_f("x")]))
    with pytest.raises(errors.InvalidGraphError, match="'x'"):
        ogt.load(p)


def test_duplicate_initializer_rejected(tmp_path):
    w = onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")
    w2 = onnx.numpy_helper.from_array(np.zeros(2, np.float32), "w")
    p = _write(tmp_path / "dupinit.onnx", _mk([helper.make_node("Add", ["x", "w"], ["y"])], [_f("x")], [_f("y")], [w, w2]))
    with pytest.raises(errors.InvalidGraphError, match="'w'"):
        ogt.load(p)


def test_duplicate_graph_input_rejected(tmp_path):
    p = _write(tmp_path / "dupin.onnx", _mk([helper.make_node("Relu", ["x"], ["y"])], [_f("x"), _f("x")], [_f("y")]))
    with pytest.raises(errors.InvalidGraphError, match="'x'"):
        ogt.load(p)


def test_non_numeric_external_offset_is_external_data_error(tmp_path):
    p = _external_model(tmp_path, "w.bin")
    m = onnx.load(str(p), load_external_data=False)
    m.graph.initializer[0].external_data[1].value = "abc"
    _write(p, m)
    with pytest.raises(errors.ExternalDataError, match="w_ext"):
        ogt.load(p)


@pytest.mark.parametrize("offset,length", [(-4, 32), (0, 4)])
def test_inconsistent_external_offset_or_length_rejected(tmp_path, offset, length):
    p = _external_model(tmp_path, "w.bin", offset=offset, length=length)
    with pytest.raises(errors.ExternalDataError, match="w_ext"):
        ogt.load(p)


# --------------------------------------------------------------------------------------------
# never overwrite the input unless asked; failed runs leave nothing


@pytest.fixture()
def inline_input(demo_path, tmp_path) -> Path:
    p = tmp_path / "in" / "model.onnx"
    p.parent.mkdir()
    p.write_bytes(demo_path.read_bytes())
    return p


@pytest.fixture()
def external_input(demo_path, tmp_path) -> Path:
    p = tmp_path / "ext" / "model.onnx"
    p.parent.mkdir()
    io.save(ogt.load(demo_path), p, external_data=True, size_threshold=256)
    return p


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("which", ["inline_input", "external_input"])
def test_transform_refuses_to_overwrite_input(request, which):
    path: Path = request.getfixturevalue(which)
    before = _snapshot(path.parent)
    result = invoke("transform", path, "-o", path, "-t", "fold-batchnorm", "-t", "cleanup")
    assert result.exit_code == errors.OutputError.exit_code
    _assert_one_error_line(result.stderr, "--overwrite")
    assert _snapshot(path.parent) == before


@pytest.mark.parametrize("which", ["inline_input", "external_input"])
def test_transform_overwrites_input_when_asked(request, which, demo_path):
    path: Path = request.getfixturevalue(which)
    result = invoke("transform", path, "-o", path, "--overwrite", "-t", "fold-batchnorm", "-t", "cleanup")
    assert result.exit_code == 0, result.output
    assert [p.name for p in path.parent.glob(".*.tmp")] == []
    after = ogt.load(path)
    assert sum(n.op_type == "BatchNormalization" for n in after.graph.node) == 0
    assert_equivalent(demo_path, path)


def test_transform_overwrites_external_input_keeping_external_data(external_input, demo_path):
    result = invoke("transform", external_input, "-o", external_input, "--overwrite", "-t", "cleanup", "--external-data")
    assert result.exit_code == 0, result.output
    after = ogt.load(external_input)
    assert after.uses_external_data()
    assert_equivalent(demo_path, external_input)


def test_transform_refuses_to_write_over_inputs_data_file(external_input):
    data = external_input.with_name("model.onnx.data")
    before = _snapshot(external_input.parent)
    result = invoke("transform", external_input, "-o", data, "-t", "cleanup")
    assert result.exit_code == errors.OutputError.exit_code
    assert _snapshot(external_input.parent) == before


def test_failed_run_unknown_transform_leaves_no_output(inline_input):
    out = inline_input.with_name("out.onnx")
    result = invoke("transform", inline_input, "-o", out, "-t", "no-such-transform")
    assert result.exit_code == 2  # a usage error, reported by click before any work
    assert "'no-such-transform' is not one of" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in inline_input.parent.iterdir()) == ["model.onnx"]


def test_failed_run_invalid_input_leaves_no_default_output(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(_demo_bytes()[:5000])
    result = invoke("transform", p, "-t", "cleanup")
    assert result.exit_code == errors.InvalidModelError.exit_code
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.onnx"]


def test_report_into_missing_folder_fails_cleanly(inline_input):
    out = inline_input.with_name("out.onnx")
    result = invoke("transform", inline_input, "-o", out, "-t", "cleanup", "--report", inline_input.parent / "no" / "r.json")
    assert result.exit_code == errors.OutputError.exit_code
    assert not out.exists()
