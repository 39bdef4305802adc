"""noisy-bias: exact without quantization (generated graphs, MiniLM), per-layer error never grows where kept."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ogt
from ogt.calib.table import CalibrationTable, TensorRange, graph_fingerprint
from ogt.errors import TransformError
from ogt.graph.query import GraphIndex
from ogt.quant.insert_qdq import InsertQDQ
from ogt.quant.noisy_bias import NoisyBias, apply_noises
from ogt.testing import assert_equivalent, run
from ogt.testing.tolerances import Tolerance


def minmax_table(model: ogt.Model, names: list[str], feeds: list[dict]) -> CalibrationTable:
    outs = [run(model, f, names) for f in feeds]
    lo = {n: min(float(o[n].min()) for o in outs) for n in names}
    hi = {n: max(float(o[n].max()) for o in outs) for n in names}
    ranges = {n: TensorRange(n, lo[n], hi[n], lo[n], hi[n], len(feeds)) for n in names}
    return CalibrationTable(graph_fingerprint(model), "minmax", len(feeds), ranges)


def _graph(draw, rng) -> tuple[onnx.ModelProto, str]:
    """x -> producer -> t -> 1-2 linear readers (MatMul[+Add] | Gemm | Conv without padding)."""
    layout = draw(st.sampled_from(["tokens", "rows", "image"]))
    k = draw(st.integers(2, 6))
    shape = {"tokens": [2, 3, k], "rows": [3, k], "image": [2, k, 3, 3]}[layout]
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    producer = draw(st.sampled_from(["relu", "biased", "input"]))
    t = "x"
    if producer == "relu":
        nodes.append(helper.make_node("Relu", ["x"], ["t"], name="act"))
        t = "t"
    elif producer == "biased":
        if layout == "image":
            nodes.append(helper.make_node("Conv", ["x", const("pw", rng.normal(0, 0.5, (k, k, 1, 1))), const("pb", rng.normal(0, 0.5, k))], ["t"], name="prod"))
        elif layout == "rows" and draw(st.booleans()):
            nodes.append(helper.make_node("Gemm", ["x", const("pw", rng.normal(0, 0.5, (k, k))), const("pb", rng.normal(0, 0.5, k))], ["t"], name="prod"))
        else:
            nodes.append(helper.make_node("MatMul", ["x", const("pw", rng.normal(0, 0.5, (k, k)))], ["pm"], name="prod"))
            nodes.append(helper.make_node("Add", ["pm", const("pb", rng.normal(0, 0.5, k))], ["t"], name="prod_bias"))
        t = "t"
    outputs = []
    for j in range(draw(st.integers(1, 2))):
        m = draw(st.integers(1, 5))
        y = f"y{j}"
        bias = draw(st.booleans())
        if layout == "image":
            kern = draw(st.sampled_from([1, 2]))
            group = draw(st.sampled_from([g for g in (1, k) if k % g == 0 and (g == 1 or m % g == 0)] or [1]))
            m = m * group if group > 1 else m
            ins = [t, const(f"w{j}", rng.normal(0, 0.5, (m, k // group, kern, kern)))]
            if bias:
                ins.append(const(f"b{j}", rng.normal(0, 0.5, m)))
            nodes.append(helper.make_node("Conv", ins, [y], name=f"lin{j}", kernel_shape=[kern, kern], group=group))
        elif layout == "rows" and draw(st.booleans()):
            trans = draw(st.booleans())
            w = rng.normal(0, 0.5, (m, k) if trans else (k, m))
            ins = [t, const(f"w{j}", w)] + ([const(f"b{j}", rng.normal(0, 0.5, m))] if bias else [])
            nodes.append(helper.make_node("Gemm", ins, [y], name=f"lin{j}", transB=int(trans),
                                          alpha=draw(st.sampled_from([1.0, 0.5])), beta=draw(st.sampled_from([1.0, 2.0]))))
        else:
            mm = f"mm{j}" if bias else y
            nodes.append(helper.make_node("MatMul", [t, const(f"w{j}", rng.normal(0, 0.5, (k, m)))], [mm], name=f"lin{j}"))
            if bias:
                nodes.append(helper.make_node("Add", [mm, const(f"b{j}", rng.normal(0, 0.5, m))], [y], name=f"lin{j}_bias"))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), t


@st.composite
def linear_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return _graph(draw, rng)


def _strip_activation_qdq(m: ogt.Model) -> ogt.Model:
    """The same graph without activation quantization: readers of each activation DQ read the Q's (Clip's) input."""
    m = m.copy()
    idx = GraphIndex(m.graph)
    for q in [n for n in idx.nodes if n.op_type == "QuantizeLinear" and not idx.is_constant(n.input[0])]:
        src = q.input[0]
        clip = idx.producer_of(src)
        if clip is not None and clip.op_type == "Clip":
            src = clip.input[0]
        for d in idx.consumers[q.output[0]]:
            for r in idx.consumers.get(idx.nodes[d].output[0], []):
                node = idx.nodes[r]
                for k, name in enumerate(node.input):
                    if name == idx.nodes[d].output[0]:
                        node.input[k] = src
    return m


def _quantized(proto: onnx.ModelProto, target: str, bits: int, feeds: list[dict]) -> tuple[ogt.Model, ogt.Model]:
    m = ogt.Model(copy.deepcopy(proto))
    plan = InsertQDQ(target=target).plan(m)
    table = minmax_table(m, plan.tensors_to_calibrate(), feeds)
    reference = m.copy()
    InsertQDQ(table=table, target=target, act_bits=bits, weighted_only=True)(m)
    return reference, m


def _heavy(shape, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))).astype(np.float32)}


def _heavy_subject(proto: onnx.ModelProto, target: str, bits: int, batches: int = 4):
    """The graph's input shape, ``batches`` heavy-tailed feeds, and (float reference, QDQ model) calibrated on them."""
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    feeds = [_heavy(shape, s) for s in range(batches)]
    return (shape, feeds, *_quantized(proto, target, bits, feeds))


@given(linear_graphs(), st.sampled_from(["ort", "tensorrt"]), st.integers(0, 1000))
def test_float_rewrite_computes_what_the_original_computes(g, target, seed):
    proto, t = g
    m = ogt.Model(copy.deepcopy(proto))
    k = proto.graph.input[0].type.tensor_type.shape.dim[1 if len(proto.graph.input[0].type.tensor_type.shape.dim) == 4 else -1].dim_value
    noise = np.random.default_rng(seed).uniform(-1, 1, k)
    placement = apply_noises(m, {t: noise}, target=target)
    assert_equivalent(proto, m)
    adds = [n for n in m.graph.node if n.op_type == "Add" and any("noise" in i for i in n.input)]
    folded = target == "tensorrt" and any(n.name == "prod" for n in proto.graph.node)
    assert placement[t] == ("add" if not folded else placement[t]) and (placement[t] != "add") == folded
    assert len(adds) == (0 if folded else 1)


@given(linear_graphs(), st.sampled_from(["ort", "tensorrt"]), st.sampled_from([4, 6]), st.integers(0, 1000))
def test_quantized_rewrite_without_quantization_equals_original(g, target, bits, seed):
    proto, t = g
    shape, feeds, _, q = _heavy_subject(proto, target, bits, batches=3)
    noisy = q.copy()
    k = shape[1] if len(shape) == 4 else shape[-1]
    apply_noises(noisy, {t: np.random.default_rng(seed).uniform(-0.5, 0.5, k)}, target=target)
    # ort: int32 biases are re-rounded, or created (a Gemm/Conv without bias): the steps of the rewritten graph
    tol = Tolerance(rtol=1e-4, atol=max(2e-3, 1.01 * _bias_step(noisy))) if target == "ort" else None
    assert_equivalent(_strip_activation_qdq(q), _strip_activation_qdq(noisy), feeds[0], tolerance=tol)


def _bias_step(m: ogt.Model) -> float:
    """The largest int32 bias step ``s_x * s_w``: rounding b and b - N W_q separately differs by up to one."""
    idx = GraphIndex(m.graph)
    steps = [0.0]
    for n in idx.nodes:
        t = idx.initializers.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if t is not None and t.data_type == onnx.TensorProto.INT32:
            steps.append(float(np.max(m.array(idx.initializers[n.input[1]]))))
    return max(steps)


def _pooled_error(reference: ogt.Model, model: ogt.Model, outputs: list[str], feeds: list[dict]) -> float:
    """What the block objective scores: all outputs' squared error over all their energy."""
    e = s = 0.0
    for f in feeds:
        a, b = run(reference, f, outputs), run(model, f, outputs)
        for o in outputs:
            e += float(((a[o].astype(np.float64) - b[o]) ** 2).sum())
            s += float((a[o].astype(np.float64) ** 2).sum())
    return e / s


def _layer_error(reference: ogt.Model, model: ogt.Model, outputs: list[str], feeds: list[dict]) -> float:
    total = 0.0
    for o in outputs:
        e = s = 0.0
        for f in feeds:
            a, b = run(reference, f, [o])[o].astype(np.float64), run(model, f, [o])[o].astype(np.float64)
            e, s = e + float(((a - b) ** 2).sum()), s + float((a**2).sum())
        total += e / s
    return total


@settings(max_examples=15)
@given(linear_graphs(), st.sampled_from(["ort", "tensorrt"]), st.sampled_from([3, 4]))
def test_layer_objective_keeps_noise_only_where_the_layer_error_drops(g, target, bits):
    """The layer objective promises each kept layer's own error drops, not the output's: with two sites
    (the producer's input and its output) noise kept upstream can raise the output error."""
    proto, _ = g
    shape, feeds, reference, q = _heavy_subject(proto, target, bits)
    before = q.copy()
    res = NoisyBias(reference=reference, data=feeds, target=target, samples=4 * shape[0], objective="layer")(q)
    for row in res.layers:
        assert row.objective == "layer" and row.block_error_before is None
        assert (row.error_after < row.error_before * 0.98) if row.kept else row.error_after == row.error_before
    event(f"kept: {any(r.kept for r in res.layers)}")
    if any(r.kept for r in res.layers):
        assert res.changed and res.counts["noisy-bias.kept"] >= 1
        assert not NoisyBias(reference=reference, data=feeds, target=target)(q).changed  # a second run
    else:
        assert not res.changed and q.proto.SerializeToString() == before.proto.SerializeToString()


@settings(max_examples=15)
@given(linear_graphs(), st.sampled_from(["ort", "tensorrt"]), st.sampled_from([3, 4]))
def test_block_objective_never_raises_the_output_error(g, target, bits):
    """No LayerNorm: every block ends at the graph outputs, so each kept noise lowers the output error
    on the search's samples (int32 bias re-rounding scored), and so does all of it together."""
    proto, _ = g
    shape, feeds, reference, q = _heavy_subject(proto, target, bits)
    before = q.copy()
    res = NoisyBias(reference=reference, data=feeds, target=target, samples=4 * shape[0], objective="block")(q)
    outs = [o.name for o in proto.graph.output]
    for row in res.layers:
        assert row.objective == "block"
        assert (row.block_error_after < row.block_error_before * 0.98) if row.kept else row.block_error_after == row.block_error_before
    event(f"kept: {any(r.kept for r in res.layers)}")
    if any(r.kept for r in res.layers):
        assert _pooled_error(reference, q, outs, feeds) <= _pooled_error(reference, before, outs, feeds) * (1 + 1e-3) + 1e-9
    else:
        assert not res.changed


LN_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
lnmlp (float[4, 16, 32] x) => (float[4, 16, 16] y) <float[32, 16] w, float[16] b, float[16] gamma, float[16] beta,
                                                    float[16, 16] w2> {
  g = Relu(x)
  o = MatMul(g, w)
  h = Add(o, b)
  n = LayerNormalization <axis = -1> (h, gamma, beta)
  y = MatMul(n, w2)
}
"""


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_block_objective_with_layernorm_never_raises_the_block_error(target):
    """Default objective with a LayerNorm is "block": the block of g ends at the LayerNorm output, and
    the kept noise lowers that output's error (measured independently on the full models)."""
    rng = np.random.default_rng(1)
    proto = onnx.parser.parse_model(LN_MLP)
    for name, shape in [("w", (32, 16)), ("b", (16,)), ("gamma", (16,)), ("beta", (16,)), ("w2", (16, 16))]:
        proto.graph.initializer.append(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
    for i, n in enumerate(proto.graph.node):
        n.name = f"{n.op_type.lower()}{i}"
    feeds = [{"x": np.random.default_rng(200 + s).lognormal(-1, 1, (4, 16, 32)).astype(np.float32)} for s in range(2)]
    reference, q = _quantized(proto, target, 4, feeds)
    before = q.copy()
    res = NoisyBias(reference=reference, data=feeds, target=target, samples=8)(q)
    row = next(r for r in res.layers if r.tensor == "g")
    assert row.objective == "block" and row.block_error_before > 0
    assert (row.block_error_after < row.block_error_before * 0.98) if row.kept else row.block_error_after == row.block_error_before
    assert _layer_error(reference, q, ["n"], feeds) <= _layer_error(reference, before, ["n"], feeds) * (1 + 1e-3) + 1e-9
    assert res.as_dict()["layers"][0]["objective"] == "block"


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[4, 32, 32] x) => (float[4, 32, 16] y) <float[32, 16] w, float[16] b> {
  g = Relu(x)
  o = MatMul(g, w)
  y = Add(o, b)
}
"""


def _mlp() -> onnx.ModelProto:
    """A heavy-tailed (log-normal) input after a Relu, into MatMul + bias: where NoisyQuant helps."""
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(MLP)
    proto.graph.initializer.extend([numpy_helper.from_array(rng.normal(0, 0.3, (32, 16)).astype(np.float32), "w"),
                                    numpy_helper.from_array(rng.normal(0, 0.3, 16).astype(np.float32), "b")])
    for i, n in enumerate(proto.graph.node):
        n.name = f"{n.op_type.lower()}{i}"
    return proto


def _lognormal(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(100 + seed).lognormal(-1, 1, (4, 32, 32)).astype(np.float32)}


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_heavy_tailed_input_keeps_noise_and_lowers_that_layer_error(target):
    proto = _mlp()
    feeds = [_lognormal(s) for s in range(3)]
    reference, q = _quantized(proto, target, 4, feeds)
    before = q.copy()
    res = NoisyBias(reference=reference, data=feeds, target=target, samples=8)(q)
    row = next(r for r in res.layers if r.tensor == "g")
    assert row.kept and row.error_after < row.error_before and row.placement == "add"
    assert _layer_error(reference, q, ["y"], feeds) < _layer_error(reference, before, ["y"], feeds)
    if target == "tensorrt":  # g comes from a Mul: TensorRT keeps a separate Add, and the report says so
        assert any("extra elementwise op" in s.reason for s in res.skipped)
    assert res.as_dict()["layers"][0]["tensor"]


def test_selection_and_refusals_are_reported():
    proto = _mlp()
    feeds = [_lognormal(s) for s in range(2)]
    reference, q = _quantized(proto, "ort", 4, feeds)
    res = NoisyBias(reference=reference, data=feeds, exclude=("MatMul",))(q.copy())
    assert not res.layers and all("excluded by pattern 'MatMul'" in s.reason for s in res.skipped)
    res = NoisyBias(reference=reference, data=feeds, include=("nothing*",))(q.copy())
    assert not res.layers and any("not matched" in s.reason for s in res.skipped)
    with pytest.raises(TransformError, match="reference"):
        NoisyBias()(q.copy())
    padded = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    c (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) <float[3, 2, 3, 3] w> { y = Conv <pads = [1, 1, 1, 1]> (x, w) }
    """)
    padded.graph.initializer.append(numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w"))
    with pytest.raises(TransformError, match="padding"):
        apply_noises(ogt.Model(padded), {"x": np.ones(2)})


def test_minilm_float_rewrite_is_exact(minilm_l3_path):
    """Noise on every linear-layer input of the real model, folded back: outputs unchanged."""
    from models import data

    m = ogt.load(minilm_l3_path)
    original = m.copy()
    from ogt.quant._noise_sites import find_sites

    sites, _ = find_sites(m, quantized=False)
    assert len(sites) >= 12
    rng = np.random.default_rng(0)
    apply_noises(m, {s.tensor: rng.uniform(-0.05, 0.05, s.channels) for s in sites})
    feeds = {k: v[:2] for k, v in data.sentences(n_calib=2, n_eval=2).calib.items()}
    assert_equivalent(original, m, feeds, tolerance=Tolerance(rtol=1e-4, atol=2e-4))


def test_cli_quantize_noisy_bias(demo_path, tmp_path):
    """``ogt quantize --noisy-bias`` on the demo CNN (no LayerNorm: the layer objective): report rows."""
    import json

    from click.testing import CliRunner

    from ogt.cli.main import cli

    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    res = CliRunner(env={"OGT_DEBUG": None}).invoke(
        cli, ["quantize", str(demo_path), "-o", str(out), "--synthetic", "8", "--act-bits", "6", "--noisy-bias",
              "--report", str(report), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(report.read_text())["noisy_bias"]
    assert rows and all(r["objective"] == "layer" for r in rows)
    assert all((r["error_after"] < r["error_before"]) if r["kept"] else r["note"] for r in rows)
    assert ogt.load(out).graph.node


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_per_channel_candidate_never_raises_a_channel_error_and_is_scored_like_the_others(target):
    """Each channel's pick includes 0 (no noise), so no channel's own quantization error grows;
    with draws on, the search still keeps only what lowers the layer error."""
    from ogt.quant._noise_sites import find_sites
    from ogt.quant.noisy_bias import _grid, per_channel_noise

    proto = _mlp()
    feeds = [_lognormal(s) for s in range(3)]
    reference, q = _quantized(proto, target, 4, feeds)
    site = next(s for s in find_sites(q, quantized=True)[0] if s.tensor == "g")
    xs = [run(reference, f, ["g"])["g"] for f in feeds]
    n = per_channel_noise(q, site, xs, 0, 4, (0.5, 1.0), (0.0, 0.25))
    scale, zp, qmin, qmax = _grid(q, site)
    rows = np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs]).astype(np.float32)

    def channel_err(noise):
        v = rows + noise.reshape(-1)
        return (((np.clip(np.round(v / scale) + zp, qmin, qmax) - zp) * scale - v) ** 2).sum(axis=0)

    assert n is not None and n.shape == site.noise_shape
    assert np.all(channel_err(n) <= channel_err(np.zeros(site.channels, np.float32)) * (1 + 1e-6) + 1e-9)
    before = q.copy()
    res = NoisyBias(reference=reference, data=feeds, target=target, samples=8, draws=4)(q)
    row = next(r for r in res.layers if r.tensor == "g")
    assert row.kept and row.error_after < row.error_before
    assert _layer_error(reference, q, ["y"], feeds) < _layer_error(reference, before, ["y"], feeds)
