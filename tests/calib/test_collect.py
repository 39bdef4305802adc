"""calibrate(): onnxruntime collection, memory-bounded groups, the table it returns."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import ogt
from ogt.calib.collect import activation_tensors, calibrate, plan_groups
from ogt.calib.qparams import QScheme
from ogt.calib.table import CalibrationTable
from ogt.errors import CalibrationError
from ogt.testing.equivalence import run

METHODS = ["minmax", "percentile", "entropy", "mse"]


@pytest.fixture(scope="module")
def demo(demo_path) -> ogt.Model:
    return ogt.load(demo_path)


def batches(n: int = 5, size: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((size, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


class OneShot:
    """A CalibrationSource-like one-shot stream (reiterable False, num_samples known)."""

    def __init__(self, data):
        self.data, self.used = data, False

    reiterable = False

    @property
    def num_samples(self) -> int:
        return sum(len(b["image"]) for b in self.data)

    def __iter__(self):
        assert not self.used, "one-shot source read twice"
        self.used = True
        return iter(self.data)


def test_default_tensors_are_every_float_activation(demo):
    names = activation_tensors(demo)
    assert names[0] == "image"
    produced = [o for n in demo.graph.node if n.op_type != "Constant" for o in n.output]
    assert names[1:] == produced
    assert not set(names) & {t.name for t in demo.graph.initializer}


def test_constant_subexpressions_are_not_activations():
    model = ogt.Model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1, 2, 3, 4}> {
            c = Constant <value = float[4] {1, 1, 1, 1}> ()
            cw = Mul (c, w)
            shape = Shape (x)
            y = Add (x, cw)
        }
    """))
    assert activation_tensors(model) == ["x", "y"]


@pytest.mark.parametrize("method", METHODS)
def test_calibrate_demo_round_trips_and_is_bound_to_its_graph(demo, method):
    table = calibrate(demo, batches(), method=method, progress=False)
    assert set(table.ranges) == set(activation_tensors(demo))
    assert table.method == method and table.samples == 20
    for r in table.ranges.values():
        assert r.min <= r.lo <= r.hi <= r.max and r.samples == 20
    assert CalibrationTable.from_json(table.to_json()) == table
    table.check(demo)
    folded = ogt.FoldBatchNorm()(demo.copy()).graph
    with pytest.raises(CalibrationError, match="another graph"):
        table.check(folded)


def test_minmax_ranges_are_the_observed_extremes(demo):
    data = batches(3)
    table = calibrate(demo, data, progress=False)
    names = activation_tensors(demo)
    outputs = [run(demo, b, names) for b in data]
    for name in names:
        r = table.ranges[name]
        assert r.min == r.lo == min(float(o[name].min()) for o in outputs)
        assert r.max == r.hi == max(float(o[name].max()) for o in outputs)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_groups_forced_by_the_budget_give_the_same_table(demo, method, caplog):
    data = batches()
    one = calibrate(demo, data, method=method, progress=False)
    with caplog.at_level(logging.INFO, logger="ogt.calib.collect"):
        split = calibrate(demo, data, method=method, progress=False, memory_budget_bytes=100_000)
    assert "passes" in caplog.text
    assert split == one
    # a one-shot source is spilled to disk for the later passes
    source = OneShot(data)
    assert calibrate(demo, source, method=method, progress=False, memory_budget_bytes=100_000) == one
    assert calibrate(demo, (b for b in data), method=method, progress=False, memory_budget_bytes=100_000) == one


def test_plan_groups():
    sizes = {"a": 10, "b": 10, "c": 25, "d": 5}
    assert plan_groups(list(sizes), sizes, 100) == [["a", "b", "c", "d"]]
    assert plan_groups(list(sizes), sizes, 20) == [["a", "b"], ["c"], ["d"]]
    assert plan_groups([], {}, 20) == [[]]


def test_options_scheme_and_observer_options_are_recorded(demo):
    scheme = QScheme(symmetric=False, signed=False)
    table = calibrate(demo, batches(2), method="percentile", observer_options={"percentile": 99.0, "bins": 512},
                      scheme=scheme, tensors=["relu1", "logits"], progress=False)
    assert set(table.ranges) == {"relu1", "logits"}
    assert table.options["observer"] == {"percentile": 99.0, "bins": 512, "axis": None}
    assert table.options["scheme"]["symmetric"] is False
    assert CalibrationTable.from_json(table.to_json()) == table
    with pytest.raises(ValueError, match="no option"):
        calibrate(demo, batches(1), method="percentile", observer_options={"pct": 1}, progress=False)
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrate(demo, batches(1), method="kl", progress=False)
    with pytest.raises(ValueError, match="axis=None"):
        calibrate(demo, batches(1), scheme=QScheme(axis=1), progress=False)


def test_empty_and_bad_sources(demo):
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(demo, [], progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(demo, iter([]), progress=False)
    with pytest.raises(CalibrationError, match="no input for"):
        calibrate(demo, [{"img": np.zeros((1, 3, 32, 32), np.float32)}], progress=False)
    with pytest.raises(CalibrationError, match="batch 1"):
        calibrate(demo, [batches(1)[0], {"image": np.zeros((1, 3, 8, 8), np.float32)}], progress=False)


def test_a_source_that_changes_between_passes_is_refused(demo):
    class Shrinking:
        def __init__(self):
            self.reads = 0

        def __iter__(self):
            self.reads += 1
            return iter(batches(3 if self.reads == 1 else 2))

    with pytest.raises(CalibrationError, match="same data"):
        calibrate(demo, Shrinking(), progress=False, memory_budget_bytes=100_000)


def test_unknown_and_subgraph_tensors_are_left_out_with_a_warning(caplog):
    model = ogt.Model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c) => (float[N, 4] y) {
            a = Relu (x)
            y = If (c) <
                then_branch = t () => (float[N, 4] inner) { inner = Neg (a) },
                else_branch = e () => (float[N, 4] other) { other = Abs (a) }
            >
        }
    """))
    data = [{"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4), "c": np.array(True)}]
    with caplog.at_level(logging.WARNING, logger="ogt.calib.collect"):
        table = calibrate(model, data, tensors=["a", "inner", "nope", "y"], progress=False)
    assert set(table.ranges) == {"a", "y"}
    assert "'inner'" in caplog.text and "'nope'" in caplog.text
    assert table.ranges["y"].min == -1.0 and table.ranges["a"].max == 1.0
    assert table.samples == 2
    empty = calibrate(model, data, tensors=["nope"], progress=False)
    assert empty.ranges == {} and empty.samples == 2


def test_external_data_model_gives_the_same_ranges(demo, tmp_path):
    path = tmp_path / "ext.onnx"
    ogt.save(demo.copy(), path, external_data=True, size_threshold=0)
    ext = ogt.load(path)
    assert ext.uses_external_data()
    data = batches(2)
    a = calibrate(demo, data, method="entropy", progress=False)
    b = calibrate(ext, data, method="entropy", progress=False, memory_budget_bytes=100_000)
    assert b.ranges == a.ranges


def test_progress_bar_is_silent_when_disabled(demo, capsys):
    calibrate(demo, batches(2), progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert calibrate(demo, batches(2), progress=True).samples == 8  # not a terminal: the bar stays off


def test_sizes_shape_inference_cannot_tell_are_measured():
    model = ogt.Model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, int64[2] s) => (float z) {
            y = Reshape (x, s)
            r = Relu (y)
            z = ReduceSum <keepdims = 0> (r)
        }
    """))
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((4, 4)).astype(np.float32), "s": np.array([8, 2])} for _ in range(3)]
    one = calibrate(model, data, method="entropy", tensors=["y", "r", "z"], progress=False)
    split = calibrate(model, data, method="entropy", tensors=["y", "r", "z"], progress=False, memory_budget_bytes=64)
    assert split == one and set(one.ranges) == {"y", "r", "z"}


def test_choose_batch_keeps_a_run_within_the_budget_and_its_probe_is_reused(demo):
    from ogt.calib.collect import choose_batch

    names = activation_tensors(demo)
    sample = {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    per_sample = sum(v.nbytes for v in run(demo, sample, names).values())
    assert choose_batch(demo, sample, names, most=8, budget_bytes=1)[0] == 1  # never below one sample
    assert choose_batch(demo, sample, names, most=8, budget_bytes=100 * per_sample)[0] == 8  # capped
    k, probe = choose_batch(demo, sample, names, most=64, budget_bytes=3 * per_sample)
    assert k == 3 and sum(probe["per_sample"].values()) == per_sample
    batches = [{"image": np.random.default_rng(i).standard_normal((3, 3, 32, 32)).astype(np.float32)} for i in range(2)]
    with_probe = calibrate(demo, batches, tensors=names, progress=False, probe=probe)
    without = calibrate(demo, batches, tensors=names, progress=False)
    assert with_probe.ranges == without.ranges
