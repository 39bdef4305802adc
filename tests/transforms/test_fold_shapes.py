"""fold-shapes: computed Reshape targets that only copy the input's own dimensions become constants."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ogt
from ogt.testing import assert_equivalent


def fold(proto: onnx.ModelProto) -> ogt.TransformResult:
    return ogt.Pipeline([ogt.FoldShapes(), ogt.Cleanup()])(ogt.Model(copy.deepcopy(proto)))


@st.composite
def shape_chains(draw):
    """Reshape(x, Concat(copied leading dims of x..., constant pieces...)) over dynamic leading dims.

    Returns (model, feeds for two different runtime shapes, number of folded Reshapes).
    """
    copied = draw(st.integers(1, 3))  # leading dims taken from Shape(x), symbolic in the graph
    tail = draw(st.lists(st.sampled_from([2, 3, 4, 6]), min_size=1, max_size=3))
    opset = draw(st.sampled_from([11, 13, 17]))
    shared_shape = draw(st.booleans())
    as_node_consts = draw(st.booleans())
    total = int(np.prod(tail))
    split = draw(st.sampled_from([d for d in (1, 2, 3, 4, 6, 8, 12) if total % d == 0]))
    pieces = [split, total // split] if draw(st.booleans()) else [total]
    grouped = draw(st.booleans())  # constants in one initializer or one per value

    names = [f"d{i}" for i in range(copied)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, names + tail)
    nodes, inits = [], []
    nodes.append(helper.make_node("Relu", ["x"], ["h"]))  # the Reshape reads an intermediate tensor
    shape_name = "s"
    if shared_shape:
        nodes.append(helper.make_node("Shape", ["h"], [shape_name]))
    concat_in = []
    for i in range(copied):
        s = shape_name if shared_shape else f"s{i}"
        if not shared_shape:
            nodes.append(helper.make_node("Shape", ["h"], [s]))
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
        nodes.append(helper.make_node("Gather", [s, f"i{i}"], [f"g{i}"], axis=0))
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"ax{i}"))
            nodes.append(helper.make_node("Unsqueeze", [f"g{i}", f"ax{i}"], [f"u{i}"]))
        else:
            nodes.append(helper.make_node("Unsqueeze", [f"g{i}"], [f"u{i}"], axes=[0]))
        concat_in.append(f"u{i}")
    groups = [pieces] if grouped else [[p] for p in pieces]
    for k, values in enumerate(groups):
        arr = np.array(values, np.int64)
        if as_node_consts:
            nodes.append(helper.make_node("Constant", [], [f"c{k}"], value=numpy_helper.from_array(arr)))
        else:
            inits.append(numpy_helper.from_array(arr, f"c{k}"))
        concat_in.append(f"c{k}")
    nodes.append(helper.make_node("Concat", concat_in, ["target"], axis=0))
    nodes.append(helper.make_node("Reshape", ["h", "target"], ["r"]))
    nodes.append(helper.make_node("Neg", ["r"], ["y"]))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, names + pieces)
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = [{"x": rng.normal(size=[draw(st.integers(1, 4)) for _ in range(copied)] + tail).astype(np.float32)}
             for _ in range(2)]
    return model, feeds


@given(shape_chains())
def test_generated_chains_fold_to_a_constant_target_and_stay_equivalent(case):
    model, feeds = case
    result = fold(model)
    assert result.counts["fold-shapes.reshape"] == 1
    ops = [n.op_type for n in result.graph.graph.node]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(ops), ops  # the chain is gone
    for f in feeds:  # two runtime shapes: the folded target must not have baked one in
        assert_equivalent(model, result.graph, f)
    assert not ogt.FoldShapes()(result.graph).changed


def _chain(text_nodes: str, extra_inputs: str = "", allowzero: str = "") -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[a, b, 6] x{extra_inputs}) => (float[a, b, 2, 3] y) <int64 i0 = {{0}}, int64 i1 = {{1}}, int64[1] ax = {{0}},
                                                             int64[2] c = {{2, 3}}> {{
{text_nodes}
    t = Concat <axis = 0> (u0, u1, c)
    y = Reshape {allowzero} (x, t)
}}
""")


SAME = """
    s = Shape (x)
    g0 = Gather <axis = 0> (s, i0)
    g1 = Gather <axis = 0> (s, i1)
    u0 = Unsqueeze (g0, ax)
    u1 = Unsqueeze (g1, ax)
"""


def test_textbook_attention_reshape_folds():
    result = fold(_chain(SAME))
    (reshape,) = result.graph.graph.node
    target = next(t for t in result.graph.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 0, 2, 3]


@pytest.mark.parametrize(
    ("nodes", "extra", "allowzero", "reason"),
    [
        (SAME.replace("(s, i0)", "(s, TMP)").replace("(s, i1)", "(s, i0)").replace("TMP", "i1"), "", "",
         "puts dimension 1 at position 0"),  # a transposition of dims is not a copy in place
        (SAME.replace("Shape (x)", "Shape (z)"), ", float[a, b, 6] z", "",
         "is a dimension of 'z', not of the reshaped 'x'"),  # equal today, not provably equal
        (SAME, "", "<allowzero = 1>", "allowzero=1"),  # 0 would mean an empty dimension
        (SAME.replace("s = Shape (x)", "s = Shape <start = 0, end = 2> (x)"), "", "", "start/end"),
    ],
)
def test_chains_that_are_not_copies_in_place_are_left_with_a_reason(nodes, extra, allowzero, reason):
    model = _chain(nodes, extra, allowzero)
    result = ogt.FoldShapes()(ogt.Model(copy.deepcopy(model)))
    assert not result.changed
    (skip,) = result.skipped
    assert skip.op_type == "Reshape" and reason in skip.reason


def test_minilm_shape_chains_fold_and_the_model_is_unchanged(minilm_l3_path):
    model = ogt.load(minilm_l3_path)
    before = copy.deepcopy(model.proto)
    result = ogt.Pipeline([ogt.FoldShapes(), ogt.Cleanup()])(model)
    assert result.counts["fold-shapes.reshape"] == 12  # 4 per layer: q, k, v split into heads, heads merged
    assert sum(n.op_type == "Shape" for n in model.graph.node) < sum(n.op_type == "Shape" for n in before.graph.node)
    rng = np.random.default_rng(0)
    for batch, tokens in ((1, 7), (3, 16)):
        feeds = {"input_ids": rng.integers(0, 30000, (batch, tokens)).astype(np.int64),
                 "attention_mask": np.ones((batch, tokens), np.int64)}
        feeds["attention_mask"][0, tokens // 2:] = 0
        assert_equivalent(before, model, feeds)
