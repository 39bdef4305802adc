"""N:M arithmetic and the packed layout: properties on generated weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ogt.kernels import sparse24
from ogt.transforms import _nm

NM = st.sampled_from([(2, 4), (1, 4), (2, 8), (4, 8), (1, 2)])


@st.composite
def weights(draw, m: int = 4, dtype=np.float32):
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 5))
    elements = st.floats(-4, 4, width=32 if dtype == np.float32 else 16, allow_subnormal=False)
    w = draw(hnp.arrays(dtype, (rows, groups * m), elements=elements | st.just(0.0)))
    return w


@given(NM.flatmap(lambda nm: st.tuples(st.just(nm), weights(nm[1]), st.booleans())))
def test_pruned_groups_keep_the_n_best_and_twice_changes_nothing(case):
    (n, m), w, scaled = case
    rng = np.random.default_rng(w.size)
    score = np.abs(w.astype(np.float64))
    if scaled:
        score = score * rng.uniform(0, 2, size=(1, w.shape[1]))
    out, zeroed = _nm.prune_rows(w, score, n, m)
    assert _nm.is_nm(out, n, m)
    assert zeroed == np.count_nonzero(w) - np.count_nonzero(out)
    kept = out != 0
    assert np.array_equal(out[kept].view(np.uint32), w[kept].view(np.uint32)), "kept values change bits"
    r, g = w.shape[0], w.shape[1] // m
    wg, sg, kg = w.reshape(r, g, m), np.broadcast_to(score, w.shape).reshape(r, g, m), out.reshape(r, g, m) != 0
    for i in range(r):
        for j in range(g):
            if np.count_nonzero(wg[i, j]) <= n:
                assert np.array_equal(out.reshape(r, g, m)[i, j], wg[i, j]), "a compliant group was changed"
                continue
            pruned = (~kg[i, j]) & (wg[i, j] != 0)
            if kg[i, j].any() and pruned.any():
                assert sg[i, j][kg[i, j]].min() >= sg[i, j][pruned].max(), "a pruned value outscored a kept one"
    again, zeroed_again = _nm.prune_rows(out, score, n, m)
    assert zeroed_again == 0 and np.array_equal(again.view(np.uint32), out.view(np.uint32))


@pytest.mark.parametrize("shape,group", [((8, 4, 3, 3), 1), ((8, 8, 1, 1), 2), ((6, 4, 1, 3), 3)])
def test_conv_rows_group_input_channels_per_kernel_position(shape, group):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    lay = _nm.Layout("conv", shape, group)
    rows = _nm.to_rows(w, lay)
    co, ci = shape[:2]
    assert rows.shape == (co * int(np.prod(shape[2:])), ci)
    spatial = int(np.prod(shape[2:]))
    for r in (0, 1, rows.shape[0] - 1):
        o, p = divmod(r, spatial)
        assert np.array_equal(rows[r], w[(o, slice(None), *np.unravel_index(p, shape[2:]))])
    assert np.array_equal(_nm.from_rows(rows, lay), w)
    norm = np.arange(ci * group, dtype=np.float64)
    scale = _nm.channel_scale_rows(norm, lay)
    per_out = int(np.prod(shape[2:]))
    last_group_row = (co - 1) * per_out
    assert np.array_equal(scale[last_group_row], norm[(group - 1) * ci : group * ci])


@given(weights(4))
def test_pack_then_unpack_is_the_pruned_weight_bit_for_bit(w):
    pruned, _ = _nm.prune_rows(w, np.abs(w), 2, 4)
    values, meta = sparse24.pack(pruned)
    k = w.shape[1]
    assert values.shape == (w.shape[0], k // 2) and values.dtype == w.dtype
    assert meta.shape == (w.shape[0], (k // 4 + 1) // 2) and meta.dtype == np.uint8
    back = sparse24.unpack(values, meta)
    expected = np.where(pruned == 0, np.float32(0), pruned)  # -0.0 comes back as +0.0
    assert np.array_equal(back.view(np.uint32), expected.view(np.uint32))
    pos = sparse24.positions(meta, k // 4)
    assert (pos[..., 0] < pos[..., 1]).all()


@given(weights(4, np.float16))
def test_pack_float16(w):
    pruned, _ = _nm.prune_rows(w, np.abs(w), 2, 4)
    back = sparse24.unpack(*sparse24.pack(pruned))
    assert np.array_equal(back, pruned)


def test_pack_layout_is_the_documented_one():
    w = np.array([[0, 5, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # groups: (1,3), (0,+1), (0,1)
    values, meta = sparse24.pack(w)
    assert values.tolist() == [[5, 7, 1, 0, 0, 0]]
    # group 0 nibble = 1 | 3 << 2 = 13 (low nibble of byte 0), group 1 nibble = 0 | 1 << 2 = 4 (high)
    assert meta.tolist() == [[13 | 4 << 4, 4]]


def test_pack_refuses_dense_groups_and_bad_k():
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        sparse24.pack(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24.pack(np.zeros((2, 6), np.float32))


def test_reference_kernel_checks_shapes():
    values, meta = sparse24.pack(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="implies K=8"):
        sparse24.sparse24_matmul(np.zeros((2, 6), np.float32), values, meta)
    assert sparse24.sparse24_matmul(np.ones((5, 2, 8), np.float32), values, meta).shape == (5, 2, 3)
