"""migrate-gamma: property tests on generated pre/post-LN blocks, named cases, real MiniLM models."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given
from onnx import numpy_helper

import ogt
from ogt.graph.patterns import layernorms
from ogt.graph.query import GraphIndex
from ogt.testing import assert_equivalent
from ogt.testing.strategies import transformer_blocks


def migrate(proto: onnx.ModelProto, **options) -> ogt.TransformResult:
    return ogt.MigrateGamma(**options)(ogt.Model(copy.deepcopy(proto)))


def ops(model: ogt.Model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def init(m: ogt.Model, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def node_by_output(m: ogt.Model, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if name in n.output)


@given(transformer_blocks())
def test_generated_blocks_migrate_equivalently(g):
    result = migrate(g.model)
    assert result.counts == g.expected_counts
    assert_equivalent(g.model, result.graph)
    idx = GraphIndex(result.graph.graph)
    for ln in layernorms(idx):  # what is left of gamma: ones, or the kept near-zero channels
        if ln.gamma is not None:
            gamma = numpy_helper.to_array(idx.constant_tensor(ln.gamma))
            assert np.all((gamma == 1) | (np.abs(gamma) < 1e-2))


@given(transformer_blocks(negatives=True))
def test_planted_negatives_are_skipped_with_reasons(g):
    result = migrate(g.model)
    assert result.counts == g.expected_counts
    reasons = " | ".join(s.reason for s in result.skipped)
    if "nonlinear-reader" in g.planted:
        assert "Relu" in reasons and "is not linear in" in reasons
    if "gamma-ones" in g.planted:
        assert "has no gamma" in reasons or "gamma is 1 on every channel" in reasons
    assert_equivalent(g.model, result.graph)


@given(transformer_blocks(negatives=True))
def test_second_run_changes_nothing_and_keeps_bytes(g):
    first = migrate(g.model)
    assert first.changed == bool(g.expected_counts)
    snapshot = first.graph.proto.SerializeToString()
    second = ogt.MigrateGamma()(first.graph)
    assert not second.changed
    assert second.counts == {}
    assert first.graph.proto.SerializeToString() == snapshot


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

POST_LN = f"""
{HEADER}
g (float[2, 3, 4] x) => (float[2, 3, 4] z) <
    float[4] gamma = {{2.0, -0.5, 0.001, 4.0}}, float[4] beta = {{0.1, 0.2, 0.3, -0.4}},
    float[4, 4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15., 16.}},
    float[4, 4] v = {{1., 0., 0., 1., 0., 1., 1., 0., 1., 1., 0., 0., 0., 0., 1., 1.}}
> {{
    h = LayerNormalization <axis = -1, epsilon = 1e-5> (x, gamma, beta)
    q = MatMul(h, w)
    k = MatMul(h, v)
    y = Add(q, k)
    z = Add(h, y)
}}
"""


def test_post_ln_block_linear_readers_read_h_prime_and_residual_gets_one_mul():
    result = migrate(model(POST_LN))
    assert result.counts == {
        "migrate-gamma.layernorm-op": 1,
        "migrate-gamma.matmul": 2,
        "migrate-gamma.residual-mul": 1,
        "migrate-gamma.kept-channel": 1,  # 0.001 < min_abs_gamma stays in the LayerNorm
    }
    g = result.graph
    ln = next(n for n in g.graph.node if n.op_type == "LayerNormalization")
    h_prime = ln.output[0]
    assert h_prime != "h"
    np.testing.assert_array_equal(init(g, ln.input[1]), np.array([1.0, 1.0, 0.001, 1.0], np.float32))
    np.testing.assert_allclose(init(g, ln.input[2]), [0.05, -0.4, 0.3, -0.1], rtol=1e-6)
    for out in ("q", "k"):  # the quantizable layers read h' directly, with diag(m) W
        mm = node_by_output(g, out)
        assert mm.input[0] == h_prime
    w_new = init(g, node_by_output(g, "q").input[1])
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(w_new, w * np.array([2.0, -0.5, 1.0, 4.0])[:, None])
    restore = node_by_output(g, "h")  # the residual branch: h = Mul(h', m)
    assert restore.op_type == "Mul" and restore.input[0] == h_prime
    np.testing.assert_array_equal(init(g, restore.input[1]), [2.0, -0.5, 1.0, 4.0])
    assert node_by_output(g, "z").input[0] == "h"
    assert sorted(t.name for t in g.graph.initializer if t.name in ("gamma", "beta", "w", "v")) == []
    assert_equivalent(model(POST_LN), g)


GEMM_TRANS_B = f"""
{HEADER}
g (float[3, 4] x) => (float[3, 2] y) <
    float[4] gamma = {{2.0, -0.5, 3.0, 4.0}},
    float[2, 4] w = {{1., 2., 3., 4., 5., 6., 7., 8.}}, float[2] c = {{0.5, -0.5}}
> {{
    h = LayerNormalization <axis = -1> (x, gamma)
    y = Gemm <transB = 1, alpha = 0.5> (h, w, c)
}}
"""


def test_gemm_trans_b_scales_columns_and_pre_ln_needs_no_mul():
    result = migrate(model(GEMM_TRANS_B))
    assert result.counts == {"migrate-gamma.layernorm-op": 1, "migrate-gamma.gemm": 1}
    g = result.graph
    gemm = node_by_output(g, "y")
    w = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(init(g, gemm.input[1]), w * np.array([2.0, -0.5, 3.0, 4.0]))
    assert ops(g) == ["LayerNormalization", "Gemm"]
    assert_equivalent(model(GEMM_TRANS_B), g)


NONLINEAR = f"""
{HEADER}
g (float[3, 4] x) => (float[3, 4] y, float[3, 4] r) <
    float[4] gamma = {{2.0, -0.5, 3.0, 4.0}}, float[4, 4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 1., 2., 3., 4., 5., 6., 7., 8.}}
> {{
    h = LayerNormalization <axis = -1> (x, gamma)
    y = MatMul(h, w)
    r = Gelu(h)
}}
"""


def test_nonlinear_reader_skips_the_block_naming_it():
    text = NONLINEAR.replace('"" : 17', '"" : 20')
    result = migrate(model(text))
    assert not result.changed
    (skip,) = result.skipped
    assert skip.op_type == "LayerNormalization"
    assert "Gelu" in skip.reason and "is not linear in 'h'" in skip.reason


SHARED = f"""
{HEADER}
g (float[3, 4] x) => (float[3, 4] y, float[3, 4] s) <
    float[4] gamma = {{2.0, -0.5, 3.0, 4.0}}, float[4, 4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 1., 2., 3., 4., 5., 6., 7., 8.}}
> {{
    h = LayerNormalization <axis = -1> (x, gamma)
    y = MatMul(h, w)
    s = MatMul(x, w)
}}
"""


def test_weight_shared_with_another_layer_is_copied_not_touched():
    result = migrate(model(SHARED))
    assert result.counts == {"migrate-gamma.layernorm-op": 1, "migrate-gamma.matmul": 1, "migrate-gamma.shared-weight-copied": 1}
    g = result.graph
    assert node_by_output(g, "s").input[1] == "w"
    np.testing.assert_array_equal(init(g, "w"), numpy_helper.to_array(model(SHARED).graph.initializer[1]))
    assert node_by_output(g, "y").input[1] != "w"
    assert_equivalent(model(SHARED), g)


DECOMPOSED = f"""
<ir_version: 8, opset_import: ["" : 18]>
g (float[2, 3, 4] x) => (float[2, 3, 4] z) <
    int64[1] axes = {{-1}}, float two = {{2.0}}, float eps = {{1e-5}},
    float[4] gamma = {{2.0, -0.5, 0.0, 4.0}}, float[4] beta = {{0.1, 0.2, 0.3, -0.4}},
    float[4, 4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15., 16.}},
    float[4] rs = {{1.0, 2.0, 3.0, 4.0}}
> {{
    mean = ReduceMean(x, axes)
    d = Sub(x, mean)
    sq = Pow(d, two)
    var = ReduceMean(sq, axes)
    ve = Add(eps, var)
    std = Sqrt(ve)
    r = Reciprocal(std)
    n = Mul(r, d)
    s = Mul(gamma, n)
    h = Add(s, beta)
    y = MatMul(h, w)
    hr = Mul(h, rs)
    z = Add(hr, y)
}}
"""


def test_decomposed_layernorm_with_a_constant_mul_on_the_residual():
    result = migrate(model(DECOMPOSED))
    assert result.counts == {
        "migrate-gamma.layernorm-decomposed": 1,
        "migrate-gamma.matmul": 1,
        "migrate-gamma.mul-folded": 1,
        "migrate-gamma.kept-channel": 1,
    }
    g = result.graph
    hr = node_by_output(g, "hr")
    np.testing.assert_allclose(init(g, hr.input[1]), [2.0, -1.0, 3.0, 16.0])
    assert "h" not in {o for n in g.graph.node for o in n.output}  # no restore Mul needed
    assert_equivalent(model(DECOMPOSED), g)


def test_min_abs_gamma_keeps_more_channels():
    result = migrate(model(POST_LN), min_abs_gamma=1.0)
    assert result.counts["migrate-gamma.kept-channel"] == 2  # 0.001 and -0.5
    assert_equivalent(model(POST_LN), result.graph)


def test_excluded_layer_keeps_its_weight_and_reads_the_restored_h():
    proto = model(POST_LN)
    next(n for n in proto.graph.node if n.output[0] == "k").name = "layer0/key"
    result = migrate(proto, exclude=("*/key",))
    assert result.counts["migrate-gamma.matmul"] == 1
    g = result.graph
    k = node_by_output(g, "k")
    assert k.input == ["h", "v"]
    assert node_by_output(g, "h").op_type == "Mul"
    assert_equivalent(model(POST_LN), g)


def test_excluding_every_linear_layer_leaves_the_layernorm_alone():
    result = migrate(model(POST_LN), exclude=("MatMul",))
    assert not result.changed
    assert "no MatMul/Gemm" in result.skipped[0].reason


def test_invalid_option_is_refused():
    with pytest.raises(ogt.OgtError, match="min_abs_gamma"):
        ogt.MigrateGamma(min_abs_gamma=0.0)


# --------------------------------------------------------------------------- real models


def _sentences(n: int = 8) -> dict[str, np.ndarray]:
    from models.data import sentences

    return {k: v[:n] for k, v in sentences(n_calib=8, n_eval=n).eval.items()}


@pytest.fixture(scope="module")
def feeds():
    try:
        return _sentences()
    except (ModuleNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))


def test_minilm_l3_every_layernorm_feeding_a_linear_layer_migrates(minilm_l3_path, feeds):
    before = ogt.load(minilm_l3_path)
    result = ogt.MigrateGamma()(before.copy())
    # 7 LayerNorms: 6 feed Q/K/V or the FFN (and a residual Add); the last feeds pooling only.
    assert result.counts == {"migrate-gamma.layernorm-op": 6, "migrate-gamma.matmul": 12, "migrate-gamma.residual-mul": 6}
    (skip,) = result.skipped
    assert "nothing to migrate gamma into" in skip.reason
    assert_equivalent(before, result.graph, feeds)


@pytest.mark.parametrize("fixture", ["minilm_l6_path", "minilm_l6_decomposed_path"])
def test_minilm_l6_exports_migrate(fixture, feeds, request):
    before = ogt.load(request.getfixturevalue(fixture))
    result = ogt.MigrateGamma()(before.copy())
    kind = "decomposed" if "decomposed" in fixture else "op"
    assert result.counts == {
        f"migrate-gamma.layernorm-{kind}": 12,
        "migrate-gamma.matmul": 24,
        "migrate-gamma.residual-mul": 12,
    }
    assert_equivalent(before, result.graph, feeds)
