"""Token-wise clipping: token extremes, the coarse alpha search, the block-wise fine stage, the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ogt
from ogt.calib.data import iterable_source
from ogt.quant.quantize import QuantizeOptions, quantize
from ogt.quant.token_clip import TokenExtremes

rng0 = np.random.default_rng(0)
H = 8
W1 = ", ".join(f"{v:.4f}" for v in rng0.normal(0, 0.4, H * H))
W2 = ", ".join(f"{v:.4f}" for v in rng0.normal(0, 0.4, H * H))
G = ", ".join(f"{v:.3f}" for v in rng0.uniform(0.5, 2.0, H))
BLOCK = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6, {H}] x) => (float[N, 6, {H}] y) <float[{H}, {H}] w1 = {{{W1}}}, float[{H}, {H}] w2 = {{{W2}}},
    float[{H}] g = {{{G}}}, float[{H}] b = {{{", ".join(["0.1"] * H)}}}> {{
    h = LayerNormalization <axis = -1> (x, g, b)
    m = MatMul (h, w1)
    r = Relu (m)
    o = MatMul (r, w2)
    a = Add (o, h)
    y = LayerNormalization <axis = -1> (a, g, b)
}}
"""


def outlier_batches(n=4, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(4, 6, H)).astype(np.float32)
        x[:, 0, 3] *= 30  # one token per sequence carries an outlier channel
        out.append({"x": x})
    return out


@given(st.integers(0, 2**16), st.sampled_from([1.0, 0.99, 0.9, 0.5]))
def test_token_extremes_are_quantiles_of_per_token_maxima_and_minima(seed, alpha):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(6, 32, 16)).astype(np.float32)
    tap = TokenExtremes()
    tap(x[:3])
    tap(x[3:])
    lo, hi = tap.clip_range(alpha)
    tmax, tmin = x.max(axis=-1).ravel(), x.min(axis=-1).ravel()
    width = max(tap.maxima.stats().bin_width, tap.minima.stats().bin_width)
    if alpha == 1.0:
        assert (lo, hi) == (float(tmin.min()), float(tmax.max()))
    else:
        assert abs(hi - np.quantile(tmax, alpha)) <= 2 * width + 1e-6
        assert abs(lo - np.quantile(tmin, 1 - alpha)) <= 2 * width + 1e-6
    assert lo <= hi


def test_token_clip_searches_alpha_and_refines_blocks():
    batches = outlier_batches()
    model = ogt.Model(onnx.parser.parse_model(BLOCK))
    result = quantize(model, iterable_source(batches),
                      QuantizeOptions(method="token-clip", act_bits=6, progress=False, placement="weighted"))
    search = result.extra["token_clip"]
    scores = {float(a): v for a, v in search["output_mse"].items()}
    assert search["alpha"] == min(scores, key=lambda a: (scores[a], -a))
    assert result.refined and all(r.error_after <= r.error_before for r in result.refined)
    assert result.table.method.startswith("token-clip")
    cos = {o.name: o.cosine_mean for o in result.outputs}
    assert cos["y"] > 0.9


def test_migrate_gamma_and_smoothquant_run_before_calibration():
    batches = outlier_batches()
    model = ogt.Model(onnx.parser.parse_model(BLOCK))
    result = quantize(model, iterable_source(batches),
                      QuantizeOptions(progress=False, migrate_gamma=True, smoothquant=0.5))
    names = [s.name for s in result.steps]
    assert names.index("migrate-gamma") < names.index("insert-qdq")
    assert names.index("smoothquant") < names.index("insert-qdq")
    migrate = next(s for s in result.steps if s.name == "migrate-gamma")
    assert migrate.counts.get("migrate-gamma.layernorm-op") == 1  # the first LN feeds the MatMul and the residual
    assert next(s for s in result.steps if s.name == "smoothquant").changed


def test_cli_token_clip_and_outlier_flags(tmp_path, demo_path):
    from click.testing import CliRunner

    from ogt.cli.main import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(demo_path), "-o", str(tmp_path / "q.onnx"), "--synthetic", "8",
                              "--batch-size", "4", "--method", "token-clip", "--migrate-gamma", "--smoothquant", "auto"])
    assert res.exit_code == 0, res.output
    assert "token-clip: alpha" in res.output
    res = runner.invoke(cli, ["quantize", str(demo_path), "-o", str(tmp_path / "x.onnx"), "--synthetic", "8",
                              "--smoothquant", "2"])
    assert res.exit_code == 2 and "--smoothquant" in res.output


@pytest.mark.slow
def test_minilm_w8a8_migrate_gamma_token_clip_keeps_cosine(minilm_l3_path):
    from models import recipes

    split = recipes.sentences(n_calib=16, n_eval=0) if "n_eval" in recipes.sentences.__code__.co_varnames else recipes.sentences()
    calib = {k: v[:16] for k, v in split.calib.items()}
    batches = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, 16, 8)]
    m = ogt.load(minilm_l3_path)
    result = quantize(m, iterable_source(batches), QuantizeOptions(method="token-clip", migrate_gamma=True, progress=False,
                                                                    placement_samples=4, report_samples=8))
    embedding = [o for o in result.outputs if o.name == "461"][0]
    assert embedding.cosine_mean > 0.99


def test_token_clip_ignores_what_padded_positions_carry():
    """A per-token model (no attention mixing): two calibration sets that differ only at padded
    positions, one with huge outliers there, give the same token-clip model."""
    from ogt.graph.query import GraphIndex

    text = BLOCK.replace(f"g (float[N, 6, {H}] x)", f"g (float[N, 6, {H}] x, float[N, 6] attention_mask)")
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(3)
    clean, dirty = [], []
    for b in outlier_batches(4):
        mask = (rng.uniform(size=(4, 6)) < 0.5).astype(np.float32)
        mask[:, 0] = 1
        x = b["x"]
        noisy = x.copy()
        noisy[mask == 0] = rng.normal(size=noisy[mask == 0].shape) * 1e3  # garbage in padded positions
        clean.append({"x": x, "attention_mask": mask})
        dirty.append({"x": noisy, "attention_mask": mask})
    opts = QuantizeOptions(method="token-clip", weight_bits=8, act_bits=6, progress=False, placement="weighted",
                           batch_size=4)

    def scales(batches):
        res = quantize(ogt.Model(onnx.ModelProto.FromString(model.SerializeToString())), iterable_source(batches), opts)
        idx = GraphIndex(res.model.graph)
        return {n.input[0]: float(res.model.array(idx.constant_tensor(n.input[1]))) for n in idx.nodes
                if n.op_type == "QuantizeLinear"}

    a, b = scales(clean), scales(dirty)
    assert a and a.keys() == b.keys()
    assert all(np.isclose(a[k], b[k], rtol=1e-6) for k in a), (a, b)
