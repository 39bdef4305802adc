"""The oracle itself: it must catch wrong rewrites and say where they went wrong."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ogt
from ogt.errors import EquivalenceError
from ogt.testing import TOLERANCES, assert_equivalent, compare, random_feeds, tolerance_for

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) <float[3] b = {1.0, 2.0, 3.0}, float[3] c = {0.5, 0.5, 0.5}> {
    h = Add (x, b)
    r = Relu (h)
    y = Mul (r, c)
}
"""


def model() -> onnx.ModelProto:
    return onnx.parser.parse_model(TEXT)


def test_identical_models_are_equivalent():
    assert_equivalent(model(), model())


def test_a_perturbed_constant_is_caught_and_located():
    bad = model()
    bad.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([1.0, 2.0, 3.1], np.float32), "b"))
    with pytest.raises(EquivalenceError) as info:
        assert_equivalent(model(), bad)
    msg = str(info.value)
    assert "output 'y'" in msg
    assert "first diverging tensor: 'h'" in msg and "Add" in msg


def test_different_outputs_are_reported():
    other = model()
    other.graph.output[0].name = "z"
    other.graph.node[-1].output[0] = "z"
    with pytest.raises(EquivalenceError, match="graph outputs differ"):
        assert_equivalent(model(), other)


def test_runs_with_optimisations_disabled_so_given_feeds_are_used():
    feeds = {"x": np.full((2, 3), -10.0, np.float32)}
    bad = model()
    bad.graph.node[1].op_type = "Abs"  # Relu vs Abs only differ for negative inputs
    with pytest.raises(EquivalenceError):
        assert_equivalent(model(), bad, feeds)
    assert_equivalent(model(), bad, {"x": np.full((2, 3), 10.0, np.float32)})


def test_random_feeds_follow_the_input_spec(demo_path):
    feeds = random_feeds(ogt.load(demo_path), dim_value=3)
    assert feeds["image"].shape == (3, 3, 32, 32) and feeds["image"].dtype == np.float32


def test_tolerance_table():
    assert tolerance_for(np.float32) is TOLERANCES[np.dtype(np.float32)]
    assert tolerance_for(np.int64).rtol == 0 and tolerance_for(np.int64).atol == 0


@given(st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_compare_accepts_rounding_and_rejects_real_errors(scale, seed):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(64) * scale).astype(np.float32)
    peak = float(np.abs(ref).max())
    assert compare(ref * np.float32(1 + 1e-6), ref).ok
    bumped = ref.copy()
    bumped[7] += np.float32(max(1.0, peak) * 1e-2)
    result = compare(bumped, ref)
    assert not result.ok and result.worst_index == (7,)


def test_compare_integer_is_exact_and_nan_matches_nan():
    assert not compare(np.array([1, 2]), np.array([1, 3])).ok
    assert compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])).ok
    assert not compare(np.array([np.nan, 1.0]), np.array([0.0, 1.0])).ok
    assert not compare(np.zeros((2, 2)), np.zeros(4)).ok
