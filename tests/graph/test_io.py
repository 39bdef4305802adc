"""ogt.graph.io: load/save round trips, external data, auto-external, atomic writes, >2 GiB models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ogt
import ogt.graph.io as io
from ogt.errors import OutputError
from ogt.graph import tensors
from ogt.graph.io import atomic_file
from ogt.testing import random_feeds, run

THRESHOLD = 256  # demo tensors: conv/deconv weights and a few others are >= 256 bytes, BN params are not


def _ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a saved model file directly in onnxruntime (it resolves external data itself)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _assert_same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"output {k}")


def _leftover_tmp(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def _arrays(model: ogt.Model) -> dict[str, np.ndarray]:
    return {t.name: model.array(t) for t in model.iter_tensors()}


@pytest.fixture()
def demo(demo_path) -> ogt.Model:
    return ogt.load(demo_path)


@pytest.fixture()
def demo_reference(demo_path):
    """Random feeds for the demo and the outputs of the original model on them."""
    feeds = random_feeds(demo_path, seed=1)
    return feeds, _ort_run(demo_path, feeds)


@pytest.fixture()
def external_demo(demo_path, tmp_path) -> Path:
    """The demo saved with external data (threshold THRESHOLD) into tmp_path/ext/."""
    folder = tmp_path / "ext"
    folder.mkdir()
    out = folder / "model.onnx"
    io.save(ogt.load(demo_path), out, external_data=True, size_threshold=THRESHOLD)
    return out


# --------------------------------------------------------------------------------------------
# inline round trip


def test_inline_round_trip(demo, demo_path, tmp_path):
    out = tmp_path / "copy.onnx"
    assert io.save(demo, out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]  # no data file, no temp files
    again = ogt.load(out)
    assert again.proto.SerializeToString() == ogt.load(demo_path).proto.SerializeToString()
    assert out.read_bytes() == demo_path.read_bytes()
    assert not again.uses_external_data()
    assert again.source == out.resolve()


def test_inline_round_trip_runs_the_same(demo, demo_reference, tmp_path):
    feeds, expected = demo_reference
    out = io.save(demo, tmp_path / "copy.onnx")
    _assert_same_outputs(_ort_run(out, feeds), expected)


# --------------------------------------------------------------------------------------------
# external data


def test_external_save_writes_data_file_beside_model(demo, demo_path, tmp_path):
    original = _arrays(ogt.load(demo_path))
    out = tmp_path / "model.onnx"
    io.save(demo, out, external_data=True, size_threshold=THRESHOLD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    saved = onnx.load(str(out), load_external_data=False)
    external = [t for t in _all_tensors(saved) if tensors.is_external(t)]
    assert external, "nothing was written as external data"
    for t in external:
        ref = tensors.external_ref(t)
        assert ref.location == "model.onnx.data"
        assert Path(ref.location).name == ref.location  # a plain file name, never a path
        assert ref.offset + ref.length <= (tmp_path / "model.onnx.data").stat().st_size
    # the in-memory model now reads from the new file, and reads the same values
    assert demo.base_dir == tmp_path.resolve()
    assert demo.source == out.resolve()
    for name, arr in _arrays(demo).items():
        np.testing.assert_array_equal(arr, original[name], err_msg=name)


def test_external_threshold_respected(demo, tmp_path):
    out = tmp_path / "model.onnx"
    io.save(demo, out, external_data=True, size_threshold=THRESHOLD)
    saved = onnx.load(str(out), load_external_data=False)
    seen_small = seen_big = 0
    for t in _all_tensors(saved):
        if tensors.is_external(t):
            assert tensors.nbytes(t) >= THRESHOLD, t.name
            seen_big += 1
        else:
            assert tensors.nbytes(t) < THRESHOLD, t.name
            assert t.raw_data or t.float_data or t.int64_data, t.name
            seen_small += 1
    assert seen_small > 0 and seen_big > 0  # the threshold really split the demo's tensors


def test_external_save_custom_location(demo, tmp_path):
    out = tmp_path / "model.onnx"
    io.save(demo, out, external_data=True, size_threshold=THRESHOLD, location="weights.bin")
    assert (tmp_path / "weights.bin").is_file()
    assert not (tmp_path / "model.onnx.data").exists()
    saved = onnx.load(str(out), load_external_data=False)
    locations = {tensors.external_ref(t).location for t in _all_tensors(saved) if tensors.is_external(t)}
    assert locations == {"weights.bin"}


@pytest.mark.parametrize("location", ["sub/w.data", "../w.data", "/tmp/w.data", ".", ".."])
def test_external_location_must_be_plain_file_name(demo, tmp_path, location):
    with pytest.raises(OutputError, match="plain file name"):
        io.save(demo, tmp_path / "model.onnx", external_data=True, location=location)
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_folder_is_output_error(demo, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        io.save(demo, tmp_path / "nope" / "model.onnx")


def test_onnxruntime_runs_external_model(external_demo, demo_reference):
    feeds, expected = demo_reference
    _assert_same_outputs(_ort_run(external_demo, feeds), expected)


def test_external_load_is_lazy(external_demo, demo_path):
    original = _arrays(ogt.load(demo_path))
    m = ogt.load(external_demo)
    external = [t for t in m.iter_tensors() if tensors.is_external(t)]
    assert external
    for t in external:
        assert not t.raw_data, f"{t.name} was read into memory at load time"
    for t in external:
        np.testing.assert_array_equal(m.array(t), original[t.name], err_msg=t.name)
        assert tensors.is_external(t), "reading a tensor must not inline it"
        assert not t.raw_data


def test_resave_external_to_another_folder_copies_data(external_demo, demo_reference, tmp_path):
    feeds, expected = demo_reference
    m = ogt.load(external_demo)
    other = tmp_path / "other"
    other.mkdir()
    out = io.save(m, other / "copy.onnx", external_data=True, size_threshold=THRESHOLD)
    assert sorted(p.name for p in other.iterdir()) == ["copy.onnx", "copy.onnx.data"]
    assert m.base_dir == other.resolve()
    # the copy must not depend on the first folder at all
    shutil.rmtree(external_demo.parent)
    _assert_same_outputs(_ort_run(out, feeds), expected)
    _assert_same_outputs(run(ogt.load(out), feeds), expected)
    _assert_same_outputs(run(m, feeds), expected)  # the in-memory model follows its new file


def test_save_over_own_path_with_external_data(external_demo, demo_reference):
    """Saving a model back onto the file it was loaded from (the --overwrite case) keeps it valid."""
    feeds, expected = demo_reference
    m = ogt.load(external_demo)
    io.save(m, external_demo)
    assert _leftover_tmp(external_demo.parent) == []
    _assert_same_outputs(_ort_run(external_demo, feeds), expected)
    assert ogt.load(external_demo).uses_external_data()


def test_external_model_saved_external_by_default(external_demo, demo_reference, tmp_path):
    feeds, expected = demo_reference
    m = ogt.load(external_demo)
    out = io.save(m, tmp_path / "default.onnx")
    assert (tmp_path / "default.onnx.data").is_file()
    assert ogt.load(out).uses_external_data()
    _assert_same_outputs(_ort_run(out, feeds), expected)


def test_external_model_saved_inline_on_request(external_demo, demo_reference, tmp_path):
    feeds, expected = demo_reference
    m = ogt.load(external_demo)
    out = io.save(m, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert not ogt.load(out).uses_external_data()
    shutil.rmtree(external_demo.parent)
    _assert_same_outputs(_ort_run(out, feeds), expected)


def test_auto_external_when_model_is_big(demo, demo_reference, tmp_path, monkeypatch):
    feeds, expected = demo_reference
    monkeypatch.setattr(io, "AUTO_EXTERNAL_BYTES", 100)
    out = io.save(demo, tmp_path / "auto.onnx")  # external_data=None: decide by size
    assert (tmp_path / "auto.onnx.data").is_file()
    assert ogt.load(out).uses_external_data()
    _assert_same_outputs(_ort_run(out, feeds), expected)


def test_inline_model_under_auto_limit_stays_inline(demo, tmp_path):
    io.save(demo, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


def test_inline_save_of_too_big_model_refused(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "AUTO_EXTERNAL_BYTES", 100)
    with pytest.raises(OutputError, match="external data"):
        io.save(demo, tmp_path / "inline.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# atomic writes


def _fail_serialize(model, out):
    raise OutputError(f"{out}: simulated failure while serializing")


def test_failed_inline_save_leaves_nothing(demo, demo_reference, tmp_path, monkeypatch):
    feeds, expected = demo_reference
    monkeypatch.setattr(io, "_serialize", _fail_serialize)
    with pytest.raises(OutputError, match="simulated"):
        io.save(demo, tmp_path / "out.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert not demo.uses_external_data()
    _assert_same_outputs(run(demo, feeds), expected)


def test_failed_inline_save_does_not_touch_existing_output(demo, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous contents")
    monkeypatch.setattr(io, "_serialize", _fail_serialize)
    with pytest.raises(OutputError):
        io.save(demo, out, external_data=False)
    assert out.read_bytes() == b"previous contents"
    assert _leftover_tmp(tmp_path) == []


def test_failed_external_save_leaves_nothing_and_restores_tensors(demo, demo_path, demo_reference, tmp_path, monkeypatch):
    feeds, expected = demo_reference
    original = _arrays(ogt.load(demo_path))
    base_dir = demo.base_dir
    monkeypatch.setattr(io, "_serialize", _fail_serialize)
    with pytest.raises(OutputError, match="simulated"):
        io.save(demo, tmp_path / "out.onnx", external_data=True, size_threshold=THRESHOLD)
    assert list(tmp_path.iterdir()) == []  # no model, no data file, no temp files
    monkeypatch.undo()
    assert not demo.uses_external_data(), "tensors still point at a data file that was deleted"
    assert demo.base_dir == base_dir
    for name, arr in _arrays(demo).items():
        np.testing.assert_array_equal(arr, original[name], err_msg=name)
    _assert_same_outputs(run(demo, feeds), expected)
    # and the model can still be saved afterwards
    out = io.save(demo, tmp_path / "out.onnx", external_data=True, size_threshold=THRESHOLD)
    _assert_same_outputs(_ort_run(out, feeds), expected)


def test_failed_external_resave_of_external_model(external_demo, demo_path, demo_reference, tmp_path, monkeypatch):
    feeds, expected = demo_reference
    original = _arrays(ogt.load(demo_path))
    m = ogt.load(external_demo)
    before = {p.name: p.read_bytes() for p in external_demo.parent.iterdir()}
    target = tmp_path / "target"
    target.mkdir()
    monkeypatch.setattr(io, "_serialize", _fail_serialize)
    with pytest.raises(OutputError):
        io.save(m, target / "out.onnx")
    monkeypatch.undo()
    assert list(target.iterdir()) == []
    assert {p.name: p.read_bytes() for p in external_demo.parent.iterdir()} == before  # input untouched
    for name, arr in _arrays(m).items():
        np.testing.assert_array_equal(arr, original[name], err_msg=name)
    _assert_same_outputs(run(m, feeds), expected)


def test_failure_at_model_rename_leaves_nothing_and_restores_tensors(demo, demo_reference, tmp_path, monkeypatch):
    feeds, expected = demo_reference

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_fsync_path", disk_full)
    with pytest.raises(OSError):
        io.save(demo, tmp_path / "out.onnx", external_data=True, size_threshold=THRESHOLD)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    _assert_same_outputs(run(demo, feeds), expected)


def test_refuses_to_overwrite_inputs_external_data(external_demo):
    m = ogt.load(external_demo)
    data = external_demo.parent / "model.onnx.data"
    before = data.read_bytes()
    with pytest.raises(OutputError, match="holds the input model's"):
        io.save(m, external_demo.parent / "other.onnx", location="model.onnx.data")
    assert data.read_bytes() == before
    assert not (external_demo.parent / "other.onnx").exists()
    assert _leftover_tmp(external_demo.parent) == []
    ogt.load(external_demo)  # input still loads


def test_atomic_file_success(tmp_path):
    final = tmp_path / "f.bin"
    with atomic_file(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        tmp.write_bytes(b"hello")
        assert not final.exists()
    assert final.read_bytes() == b"hello"
    assert _leftover_tmp(tmp_path) == []


def test_atomic_file_leaves_no_temp_on_exception(tmp_path):
    final = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_keeps_previous_contents_on_exception(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"new but incomplete")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"old"
    assert _leftover_tmp(tmp_path) == []


# --------------------------------------------------------------------------------------------
# a real > 2 GiB model (sparse data file: no disk or RAM spent on the zeros)

BIG_ROWS, BIG_COLS = 135_000_000, 4  # float32: 540M elements, 2.16 GB > 2 GiB


def _big_model(folder: Path) -> Path:
    n_bytes = BIG_ROWS * BIG_COLS * 4
    assert n_bytes > 2**31
    with open(folder / "big.bin", "wb") as f:
        f.truncate(n_bytes)
    big = TensorProto()
    big.name = "big"
    big.data_type = TensorProto.FLOAT
    big.dims.extend([BIG_ROWS, BIG_COLS])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(n_bytes))):
        entry = big.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Gather", ["big", "idx"], ["y"], axis=0)],
        "big",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, BIG_COLS])],
        initializer=[big],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _gather(path: Path) -> np.ndarray:
    idx = np.array([0, BIG_ROWS // 2, BIG_ROWS - 1], dtype=np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        return session.run(["y"], {"idx": idx})[0]
    finally:
        del session


@pytest.mark.skipif(shutil.disk_usage("/tmp").free < 8 * 2**30, reason="needs ~3 GB free disk for the copied data")
def test_real_model_over_2gib(tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = _big_model(src_dir)
    try:
        m = ogt.load(src)
        assert m.weight_bytes() > 2**31
        (big,) = m.graph.initializer
        assert tensors.is_external(big) and not big.raw_data
        out = io.save(m, dst_dir / "big.onnx")  # defaults must choose external data
        saved = onnx.load(str(out), load_external_data=False)
        (t,) = saved.graph.initializer
        assert tensors.is_external(t)
        assert tensors.external_ref(t).location == "big.onnx.data"
        assert (dst_dir / "big.onnx.data").stat().st_size >= BIG_ROWS * BIG_COLS * 4
        assert out.stat().st_size < 2**20
        expected = np.zeros((3, BIG_COLS), np.float32)
        np.testing.assert_array_equal(_gather(src), expected)
        np.testing.assert_array_equal(_gather(out), expected)
    finally:
        shutil.rmtree(src_dir, ignore_errors=True)
        shutil.rmtree(dst_dir, ignore_errors=True)


def _all_tensors(proto: onnx.ModelProto):
    from ogt.graph.model import iter_graph_tensors

    return list(iter_graph_tensors(proto.graph))
