"""Padding-aware objectives: which positions are tokens, and that padded ones never count."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ogt.quant.token_clip import TokenExtremes
from ogt.quant.tokens import token_mask, weighted_sq


def test_token_mask_reads_a_2d_mask_input_and_nothing_else():
    ids = np.ones((2, 5), np.int64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    got = token_mask({"input_ids": ids, "attention_mask": mask})
    assert got.dtype == np.float64 and np.array_equal(got, mask)
    assert token_mask({"input_ids": ids}) is None  # no mask: every position counts
    assert token_mask({"mask": np.ones((2, 5, 1))}) is None  # not [batch, sequence]
    assert token_mask({"pixel_values": np.ones((2, 3), np.float32)}) is None


@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(2, 7), st.integers(1, 5))
def test_weighted_sq_counts_exactly_the_real_tokens(seed, b, s, h):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(b, s, h))
    mask = (rng.uniform(size=(b, s)) < 0.6).astype(np.float64)
    assert np.isclose(weighted_sq(a, mask), float((a[mask.astype(bool)] ** 2).sum()))
    assert np.isclose(weighted_sq(a, None), float((a**2).sum()))
    assert np.isclose(weighted_sq(a[:, :1, :1].reshape(b, 1), mask), float((a[:, :1, :1] ** 2).sum()))  # other shapes: all


def test_token_extremes_ignore_padded_positions():
    """An outlier in a padded position changes nothing; the same outlier in a real token does."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)
    padded = x.copy()
    padded[0, 5, 3] = 500.0
    clean, planted, unmasked = TokenExtremes(), TokenExtremes(), TokenExtremes(token_weights=False)
    clean(x, {"attention_mask": mask})
    planted(padded, {"attention_mask": mask})
    unmasked(padded, {"attention_mask": mask})
    assert planted.clip_range(1.0) == clean.clip_range(1.0)
    assert unmasked.clip_range(1.0)[1] == 500.0
    real = x.copy()
    real[0, 2, 3] = 500.0
    seen = TokenExtremes()
    seen(real, {"attention_mask": mask})
    assert seen.clip_range(1.0)[1] == 500.0



def test_channel_means_for_bias_correction_leave_padding_out():
    from ogt.quant.bias_correction import ChannelMean

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 4))
    mask = (rng.uniform(size=(3, 5)) < 0.5).astype(np.int64)
    mask[0, 0] = 1
    tap = ChannelMean(-1)
    tap(x[:2], {"attention_mask": mask[:2]})
    tap(x[2:], {"attention_mask": mask[2:]})
    assert np.allclose(tap.mean, x[mask.astype(bool)].mean(axis=0))
    plain = ChannelMean(-1)
    plain(x)  # no batch (or no mask): every position
    assert np.allclose(plain.mean, x.reshape(-1, 4).mean(axis=0))
    conv = ChannelMean(1)  # NCHW: the channel axis is not a token axis; the mask does not apply
    y = rng.normal(size=(3, 5, 2, 2))
    conv(y, {"attention_mask": mask})
    assert np.allclose(conv.mean, y.mean(axis=(0, 2, 3)))
