"""prune-nm: properties on generated graphs, named negative cases, real models, composition with quantization."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ogt
from ogt.graph.query import GraphIndex
from ogt.sparsity import sparsity_report
from ogt.testing import assert_equivalent, random_feeds
from ogt.transforms import _nm
from ogt.transforms.prune_nm import PruneNM, collect_norms, layer_of


@dataclasses.dataclass
class Case:
    model: onnx.ModelProto
    prunable: dict[str, str]  # node name -> op kind expected to be pruned
    refused: dict[str, str]  # node name -> words of the skip reason

    def __repr__(self) -> str:
        return f"Case(ops={[n.op_type for n in self.model.graph.node]}, prunable={self.prunable}, refused={self.refused})"


@st.composite
def layer_graphs(draw) -> Case:
    """One weighted layer (Conv incl. grouped/depthwise, MatMul on 2-D or 3-D input, Gemm with transB), then Relu."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["conv", "matmul", "gemm"]))
    as_node = draw(st.booleans())
    nodes, inits, prunable, refused = [], [], {}, {}

    def const(name, arr):
        t = numpy_helper.from_array(arr.astype(np.float32), name)
        if as_node:
            nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=t))
        else:
            inits.append(t)
        return name

    if kind == "conv":
        cin = draw(st.sampled_from([3, 4, 8, 12]))
        group = draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
        cout = group * draw(st.integers(1, 3))
        k = draw(st.sampled_from([1, 3]))
        x_shape = [1, cin, 5, 5]
        w = const("W", rng.standard_normal((cout, cin // group, k, k)))
        nodes.append(helper.make_node("Conv", ["x", w], ["y"], name="layer", group=group, pads=[k // 2] * 4))
        if group > 1 and cin // group == 1:
            refused["layer"] = "depthwise"
        elif (cin // group) % 4:
            refused["layer"] = "not a multiple of 4"
        else:
            prunable["layer"] = "conv"
    else:
        k_dim = draw(st.sampled_from([4, 6, 8, 16]))
        n_dim = draw(st.sampled_from([3, 8]))
        if kind == "matmul":
            x_shape = draw(st.sampled_from([[2, k_dim], [2, 3, k_dim]]))
            w = const("W", rng.standard_normal((k_dim, n_dim)))
            nodes.append(helper.make_node("MatMul", ["x", w], ["y"], name="layer"))
        else:
            x_shape = [2, k_dim]
            trans_b = draw(st.integers(0, 1))
            w = const("W", rng.standard_normal((n_dim, k_dim) if trans_b else (k_dim, n_dim)))
            c = const("C", rng.standard_normal(n_dim))
            nodes.append(helper.make_node("Gemm", ["x", w, c], ["y"], name="layer", transB=trans_b, alpha=0.5))
        if k_dim % 4:
            refused["layer"] = "not a multiple of 4"
        else:
            prunable["layer"] = kind
    nodes.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return Case(model, prunable, refused)


def prune(proto: onnx.ModelProto, **options) -> ogt.TransformResult:
    return PruneNM(**options)(ogt.Model(copy.deepcopy(proto)))


def weight_rows(model: ogt.Model, node_name: str) -> np.ndarray:
    idx = GraphIndex(model.graph)
    i = next(i for i, n in enumerate(idx.nodes) if n.name == node_name or n.name == f"{node_name}.gemm")
    layer = layer_of(model, idx, i, 4)
    return _nm.to_rows(model.array(layer.tensor), layer.layout)


@given(layer_graphs())
def test_generated_layers_are_pruned_to_2_4_or_skipped_with_the_reason(case):
    result = prune(case.model)
    expected = {f"prune-nm.{k}": v for k, v in Counter(case.prunable.values()).items()}
    assert {k: v for k, v in result.counts.items() if k != "prune-nm.zeroed"} == expected
    for name in case.prunable:
        rows = weight_rows(result.graph, name)
        assert _nm.is_nm(rows, 2, 4)
        assert np.count_nonzero(rows) == rows.size // 2  # random normal weights: exactly 2 of 4 kept
    reasons = {s.node: s.reason for s in result.skipped}
    for name, words in case.refused.items():
        assert words in reasons[name]
    snapshot = result.graph.proto.SerializeToString()
    again = PruneNM()(result.graph)
    assert not again.changed and again.counts == {}
    assert result.graph.proto.SerializeToString() == snapshot


@given(layer_graphs())
def test_activation_criterion_keeps_the_best_by_weight_times_input_norm(case):
    model = ogt.Model(copy.deepcopy(case.model))
    feeds = random_feeds(model)
    x = feeds["x"]
    axis = 1 if case.model.graph.node[-2].op_type == "Conv" else x.ndim - 1
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    feeds["x"] = x * np.linspace(0.1, 3, x.shape[axis], dtype=np.float32).reshape(shape)  # channels differ in scale
    norms = collect_norms(model, [feeds])
    result = PruneNM(criterion="activation", norms=norms)(model)
    for name in case.prunable:
        before = ogt.Model(case.model)
        idx = GraphIndex(before.graph)
        layer = layer_of(before, idx, next(i for i, n in enumerate(idx.nodes) if n.name == name), 4)
        rows = _nm.to_rows(before.array(layer.tensor), layer.layout)
        norm = norms.get(layer.activation, layer.axis)
        score = np.abs(rows.astype(np.float64)) * _nm.channel_scale_rows(norm, layer.layout)
        expected, _ = _nm.prune_rows(rows, score, 2, 4)
        assert np.array_equal(weight_rows(result.graph, name), expected)


@given(layer_graphs())
def test_tensorrt_target_rewrites_matmul_to_gemm_with_the_same_numbers(case):
    ort_result = prune(case.model)
    trt_result = prune(case.model, target="tensorrt")
    ops = [n.op_type for n in trt_result.graph.graph.node]
    if case.prunable.get("layer") == "matmul":
        assert "MatMul" not in ops and "Gemm" in ops
        assert trt_result.counts["prune-nm.to-gemm"] == 1
        gemm = next(n for n in trt_result.graph.graph.node if n.op_type == "Gemm")
        assert [a.i for a in gemm.attribute if a.name == "transB"] == [1]
    assert_equivalent(ort_result.graph, trt_result.graph)
    again = PruneNM(target="tensorrt")(trt_result.graph)
    assert not again.changed


def test_magnitude_keeps_the_two_largest_of_each_group_and_renames_the_weight():
    case = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 4] y) <float[8, 4] W = {%s}> { y = MatMul(x, W) }
    """ % ", ".join(str(v) for v in np.arange(1, 33)))
    result = PruneNM()(case)
    w = result.graph.array(result.graph.graph.initializer[0])
    assert _nm.is_nm(w.T, 2, 4)
    # in each group of 4 rows of W (4 values of K), the two largest magnitudes survive: rows 2,3 and 6,7
    assert np.count_nonzero(w[[0, 1, 4, 5]]) == 0 and np.count_nonzero(w[[2, 3, 6, 7]]) == 16
    assert result.graph.graph.initializer[0].name != "W"  # new values, new name


def text_model(text: str) -> ogt.Model:
    return ogt.Model(onnx.parser.parse_model(text))


CONV_PAIR = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 4, 4] x, float[8, 8, 1, 1] Wg) => (float[1, 8, 4, 4] z, float[1, 8, 4, 4] u, float[1, 8, 4, 4] v)
    <float[8, 8, 1, 1] W1 = {%(w)s}, float[8, 8, 1, 1] W2 = {%(w)s}> {
        y = Conv <group = 1> (x, W1)
        z = Conv <group = 1> (y, W1)
        u = Conv <group = 1> (x, Wg)
        v = Conv <group = 1> (x, W2)
    }
"""


def test_named_negatives():
    w = ", ".join(str(v) for v in np.random.default_rng(0).standard_normal(64).round(3))
    model = text_model(CONV_PAIR % {"w": w})
    result = PruneNM()(model)
    assert result.counts.get("prune-nm.conv") == 1  # only v's W2
    text = " | ".join(s.reason for s in result.skipped)
    assert "is shared with" in text
    assert "not a constant" in text or "is an initializer that is also a graph input" in text


def test_exclude_and_min_channels():
    case = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 64] y, float[2, 4] z)
        <float[8, 64] A = {%s}, float[8, 4] B = {%s}> { y = MatMul(x, A) z = MatMul(x, B) }
    """ % (", ".join(["1.5", "-2", "0.5", "3"] * 128), ", ".join(["1.5", "-2", "0.5", "3"] * 8)))
    for n in case.graph.node:
        n.name = f"mm_{n.output[0]}"
    excluded = PruneNM(exclude=("mm_y",))(case.copy())
    assert excluded.counts["prune-nm.matmul"] == 1
    assert any("excluded by pattern 'mm_y'" in s.reason for s in excluded.skipped)
    small = PruneNM(min_channels=8)(case.copy())
    assert small.counts["prune-nm.matmul"] == 1
    assert any("fewer than min_channels=8" in s.reason and s.node == "mm_z" for s in small.skipped)


def test_activation_without_statistics_for_a_layer_is_a_skip():
    case = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 4] z) <float[8, 4] B = {%s}> { z = MatMul(x, B) }
    """ % ", ".join(["1.5", "-2", "0.5", "3"] * 8))
    from ogt.calib.channel_norms import ChannelNorms

    result = PruneNM(criterion="activation", norms=ChannelNorms({}, 1, ""))(case)
    assert not result.changed
    assert "no activation statistics for input 'x'" in result.skipped[0].reason
    with pytest.raises(ValueError, match="needs activation statistics"):
        PruneNM(criterion="activation")
    with pytest.raises(ValueError, match="1 <= n < m"):
        PruneNM(n=4, m=4)


@pytest.mark.slow
def test_mobilenet_v2_activation_pruning_on_photo_crops(mobilenet_v2_path):
    from models import data

    split = data.imagenet_crops(n_calib=4, n_eval=8)
    model = ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(ogt.load(mobilenet_v2_path)).graph
    norms = collect_norms(model, [split.calib])
    result = PruneNM(criterion="activation", norms=norms, target="tensorrt")(model)
    assert result.counts["prune-nm.conv"] == 34 and result.counts["prune-nm.gemm"] == 1
    report = sparsity_report(result.graph)
    assert sum(w.sparse for w in report) == 35
    assert sum("depthwise" in w.reason for w in report) == 17


@pytest.mark.slow
def test_minilm_prune_for_tensorrt_then_quantize_keeps_the_pattern(minilm_l3_path):
    from models import data
    from ogt.calib.data import iterable_source
    from ogt.quant.quantize import QuantizeOptions, quantize

    split = data.sentences(n_calib=4, n_eval=4)
    batches = [{k: v[i : i + 2] for k, v in split.calib.items()} for i in range(0, 4, 2)]
    model = ogt.load(minilm_l3_path)
    norms = collect_norms(model, batches)
    pruned = PruneNM(criterion="activation", norms=norms, target="tensorrt")(model).graph
    assert sum(w.sparse for w in sparsity_report(pruned)) == 18
    q = quantize(pruned, iterable_source(batches), QuantizeOptions(target="tensorrt", placement="weighted", progress=False))
    report = sparsity_report(q.model)
    quantized = [w for w in report if "(quantized)" in w.reason]
    assert len(quantized) == 18 and all(w.sparse and w.eligible for w in quantized)
