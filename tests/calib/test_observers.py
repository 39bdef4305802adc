"""Observers: streaming, exactly mergeable histograms; each method's clip range on known data."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ogt.calib.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    bin_exponent,
    kl_threshold_bins,
    make_observer,
)
from ogt.calib.qparams import QScheme, fake_quantize

METHODS = sorted(OBSERVERS)
SCHEMES = [
    QScheme(),
    QScheme(signed=False, symmetric=False),
    QScheme(bits=4, narrow=True),
    QScheme(bits=6, signed=True, symmetric=False),
]
SHAPES = ("normal", "laplace", "relu", "negative", "uniform", "zeros", "outliers", "constant")


def sample(rng: np.random.Generator, kind: str, n: int, scale: float) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "laplace":
        x = rng.laplace(size=n)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(n), 0)
    elif kind == "negative":
        x = -rng.exponential(size=n)
    elif kind == "uniform":
        x = rng.uniform(0.5, 3.0, n)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "constant":
        x = np.full(n, -1.75)
    else:
        x = rng.laplace(size=n)
        x[rng.integers(0, n, max(1, n // 500))] *= 200
    return (x * scale).astype(np.float32)


@st.composite
def split_data(draw, per_channel: bool = False):
    """A float32 array made of segments of different scales (so later pieces grow the histogram), and cut points."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    segments = draw(st.lists(st.tuples(st.sampled_from(SHAPES), st.integers(1, 400), st.integers(-40, 40)),
                             min_size=1, max_size=4))
    parts = [sample(rng, kind, n, 2.0**e * rng.uniform(0.5, 1.5)) for kind, n, e in segments]
    x = np.concatenate(parts)
    if per_channel:
        c = draw(st.integers(1, 4))
        x = np.resize(x, (max(1, len(x) // c), c))
    cuts = sorted(draw(st.lists(st.integers(0, len(x)), max_size=4)))
    return x, cuts


def pieces(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    edges = [0, *cuts, len(x)]
    return [x[a:b] for a, b in itertools.pairwise(edges)]


def options(method: str, bins: int) -> dict:
    return {} if method == "minmax" else {"bins": bins}


@given(split_data(), st.sampled_from(METHODS), st.sampled_from([16, 64, 2048]), st.randoms(use_true_random=False))
def test_merge_and_streaming_equal_observing_the_concatenation(data, method, bins, random):
    x, cuts = data
    whole = make_observer(method, **options(method, bins))
    whole.update(x)

    streamed = make_observer(method, **options(method, bins))
    shards = []
    for p in pieces(x, cuts):
        streamed.update(p)
        shard = make_observer(method, **options(method, bins))
        shard.update(p)
        shards.append(shard)
    random.shuffle(shards)
    merged = shards[0]
    for s in shards[1:]:
        merged.merge(s)

    expected = whole.stats()
    assert streamed.stats() == expected
    assert merged.stats() == expected
    if expected.counts is not None:
        assert int(expected.counts.sum()) == x.size
    for scheme in SCHEMES:
        assert merged.clip_range(scheme) == whole.clip_range(scheme)
        assert streamed.clip_range(scheme) == whole.clip_range(scheme)


@given(split_data(per_channel=True), st.sampled_from(METHODS))
def test_per_channel_merge_equals_the_concatenation(data, method):
    x, cuts = data
    whole = make_observer(method, axis=1, **options(method, 64))
    whole.update(x)
    shards = []
    for p in pieces(x, cuts):
        s = make_observer(method, axis=1, **options(method, 64))
        s.update(p)
        shards.append(s)
    merged = shards[-1]
    for s in shards[:-1]:
        merged.merge(s)
    assert merged.stats() == whole.stats()
    lo, hi = merged.clip_range(QScheme(axis=1))
    lo_w, hi_w = whole.clip_range(QScheme(axis=1))
    assert np.array_equal(lo, lo_w) and np.array_equal(hi, hi_w)
    assert lo.shape == hi.shape == (x.shape[1],)


@given(split_data())
def test_histogram_is_the_exact_histogram_of_the_data(data):
    x, _ = data
    obs = PercentileObserver(bins=64)
    for p in pieces(x, data[1]):
        obs.update(p)
    st_ = obs.stats()
    amax = float(np.abs(x).max())
    width = st_.bin_width
    assert 64 * width > amax and (amax == 0 or 32 * width <= amax or width == 2.0**-100)
    expected, _ = np.histogram(x.astype(np.float64), bins=st_.edges)
    assert np.array_equal(st_.counts, expected)


def test_bin_exponent_is_the_smallest_power_of_two_that_fits():
    for amax in [0.0, 1e-35, 0.1, 1.0, 2047.0, 2048.0, 2048.0000001, 3.0e38]:
        e = int(bin_exponent(np.array([amax]), 2048)[0])
        assert 2048 * 2.0**e > amax
        assert e == -100 or 2048 * 2.0 ** (e - 1) <= amax


def test_minmax_per_tensor_and_per_channel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32) * np.array([1, 10, 100], np.float32)[None, :, None, None]
    t = MinMaxObserver()
    t.update(x[:2])
    t.update(x[2:])
    assert t.clip_range(QScheme()) == (float(x.min()), float(x.max()))
    c = MinMaxObserver(axis=1)
    c.update(x[:4])
    c.update(x[4:])
    lo, hi = c.clip_range(QScheme(axis=1))
    np.testing.assert_array_equal(lo, x.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(hi, x.max(axis=(0, 2, 3)))
    st_ = c.stats()
    assert st_.count == x.size and st_.axis == 1 and not st_.min.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        st_.count = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="channels"):
        c.update(x[:, :2])


@pytest.mark.parametrize("p", [99.0, 99.9, 99.999])
@pytest.mark.parametrize("kind", ["normal", "laplace", "relu", "outliers"])
def test_percentile_matches_numpy_within_one_bin(p, kind):
    x = sample(np.random.default_rng(1), kind, 200_000, 3.0)
    obs = PercentileObserver(percentile=p)
    for chunk in np.array_split(x, 7):
        obs.update(chunk)
    w = obs.stats().bin_width
    lo, hi = obs.clip_range(QScheme())  # symmetric: the percentile of |x|, intersected with [min, max]
    assert abs(max(-lo, hi) - np.percentile(np.abs(x), p)) <= w * 1.001
    lo, hi = obs.clip_range(QScheme(symmetric=False, signed=False))
    assert abs(lo - max(np.percentile(x, 100 - p), x.min())) <= w * 1.001
    assert abs(hi - np.percentile(x, p)) <= w * 1.001
    assert PercentileObserver(percentile=100.0).__class__ is PercentileObserver


def test_percentile_100_is_minmax():
    x = sample(np.random.default_rng(2), "outliers", 10_000, 1.0)
    obs = PercentileObserver(percentile=100.0)
    obs.update(x)
    assert obs.clip_range(QScheme()) == (float(x.min()), float(x.max()))


def heavy_tailed(seed: int = 0, n: int = 400_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=n).astype(np.float32)
    x[rng.integers(0, n, 8)] = rng.choice([-1, 1], 8) * rng.uniform(40, 60, 8)
    return x


def test_entropy_clips_heavy_tails_and_keeps_uniform_data():
    x = heavy_tailed()
    obs = EntropyObserver()
    obs.update(x)
    amax = float(np.abs(x).max())
    lo, hi = obs.clip_range(QScheme())
    assert 0 < hi < 0.7 * amax and lo == -hi  # does not degenerate to minmax
    assert hi > np.percentile(np.abs(x), 99.9)  # nor clips the body of the distribution
    u = np.random.default_rng(1).uniform(-5, 5, 400_000).astype(np.float32)
    obs = EntropyObserver()
    obs.update(u)
    lo, hi = obs.clip_range(QScheme())
    assert 0.95 * 5 <= hi <= float(np.abs(u).max())
    # asymmetric and unsigned on one-signed data
    relu = np.maximum(x, 0)
    obs = EntropyObserver()
    obs.update(relu)
    lo, hi = obs.clip_range(QScheme(signed=False, symmetric=False))
    assert lo == 0.0 and 0 < hi < relu.max()


@given(st.integers(0, 2**16), st.sampled_from([0.99, 0.999, 0.9999]), st.booleans())
def test_entropy_coverage_bounds_the_clipped_fraction(seed, coverage, signed):
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=20_000).astype(np.float32) * rng.uniform(0.1, 10)
    if not signed:
        x = np.maximum(x, 0)
    scheme = QScheme() if signed else QScheme(signed=False, symmetric=False)
    bounded, free = EntropyObserver(coverage=coverage), EntropyObserver(coverage=0.0)
    bounded.update(x)
    free.update(x)
    lo, hi = bounded.clip_range(scheme)
    width = bounded.stats().edges[1] - bounded.stats().edges[0] if bounded.stats().edges is not None else 0.0
    clipped = np.mean((x > hi + width) | (x < lo - width))
    assert clipped <= (1 - coverage) * (2 if signed else 1) + 1e-9
    f_lo, f_hi = free.clip_range(scheme)
    assert hi >= f_hi - 1e-6 and lo <= f_lo + 1e-6  # the bound only ever widens TensorRT's choice
    with pytest.raises(ValueError, match="coverage"):
        EntropyObserver(coverage=1.0)


def test_kl_search():
    assert kl_threshold_bins(np.ones(1024), 128) == 1024  # uniform: nothing to clip
    k = np.arange(2000)
    decaying = np.concatenate([np.floor(1e6 * np.exp(-k / 60.0)), [1.0]])  # tail ends at bin 828, one outlier
    assert 128 <= kl_threshold_bins(decaying, 128) < 828
    assert kl_threshold_bins(np.ones(100), 128) == 100  # fewer bins than levels: keep all


@pytest.mark.parametrize("scheme", [QScheme(), QScheme(signed=False, symmetric=False), QScheme(bits=4)])
def test_mse_beats_minmax_on_heavy_tailed_data(scheme):
    x = heavy_tailed(3, n=100_000)
    mse, mm = MseObserver(), MinMaxObserver()
    for chunk in np.array_split(x, 3):
        mse.update(chunk)
        mm.update(chunk)

    def err(obs: Observer) -> float:
        lo, hi = obs.clip_range(scheme)
        return float(np.mean((fake_quantize(x, lo, hi, scheme) - x) ** 2))

    assert err(mse) < err(mm)
    lo, hi = mse.clip_range(scheme)
    assert x.min() <= lo <= 0 <= hi <= x.max()
    # and it is the best range on a fine grid of (a min, a max), measured on the data itself
    alphas = np.linspace(0.02, 1, 100)
    grid = [float(np.mean((fake_quantize(x, a * x.min(), a * x.max(), scheme) - x) ** 2)) for a in alphas]
    assert err(mse) <= 1.01 * min(grid)


def test_mse_keeps_the_range_of_uniform_data():
    u = np.random.default_rng(4).uniform(-1, 1, 200_000).astype(np.float32)
    obs = MseObserver()
    obs.update(u)
    _, hi = obs.clip_range(QScheme())
    assert hi > 0.95


@pytest.mark.parametrize("method", METHODS)
def test_state_does_not_grow_with_updates(method):
    def state_bytes(obs: Observer) -> int:
        return sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray))

    rng = np.random.default_rng(5)
    obs = make_observer(method)
    obs.update(rng.standard_normal(1000).astype(np.float32))
    size = state_bytes(obs)
    for k in range(60):
        obs.update(rng.standard_normal(1000).astype(np.float32) * 2.0 ** (k % 30))
    assert state_bytes(obs) == size
    assert obs.stats().count == 61_000


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_values_are_counted_and_ignored(method):
    x = np.array([1.0, np.inf, -2.0, np.nan, 0.5, -np.inf], np.float32)
    obs = make_observer(method)
    obs.update(x)
    st_ = obs.stats()
    assert (st_.min, st_.max, st_.count, st_.nonfinite) == (-2.0, 1.0, 3, 3)
    lo, hi = obs.clip_range(QScheme())
    assert np.isfinite(lo) and np.isfinite(hi)
    per_channel = make_observer(method, axis=0)
    per_channel.update(np.array([[1.0, np.nan], [np.inf, -3.0]], np.float32))
    assert per_channel.stats().nonfinite == 2
    np.testing.assert_array_equal(per_channel.stats().max, [1.0, -3.0])


def test_float16_float64_and_integer_input():
    for dtype in (np.float16, np.float64, np.int32):
        obs = PercentileObserver(bins=64)
        obs.update(np.arange(-5, 6).astype(dtype))
        assert (obs.stats().min, obs.stats().max) == (-5.0, 5.0)


def test_unobserved_and_empty():
    obs = EntropyObserver()
    obs.update(np.zeros((0, 3), np.float32))
    assert obs.stats().count == 0 and not obs.observed
    with pytest.raises(ValueError, match="no finite values"):
        obs.clip_range(QScheme())
    other = EntropyObserver()
    other.update(np.ones(4, np.float32))
    obs.merge(other)
    assert obs.stats() == other.stats()


def test_make_observer_errors():
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        make_observer("kl")
    with pytest.raises(ValueError, match="accepts: percentile, bins, axis"):
        make_observer("percentile", bin=10)
    with pytest.raises(ValueError, match="percentile must be"):
        make_observer("percentile", percentile=0)
    with pytest.raises(ValueError, match="bins"):
        make_observer("entropy", bins=3)
    with pytest.raises(ValueError, match="cannot merge"):
        make_observer("entropy").merge(make_observer("mse"))
    with pytest.raises(ValueError, match="cannot merge"):
        make_observer("entropy", bins=64).merge(make_observer("entropy"))
    assert make_observer("percentile", percentile=99.9).config() == {"percentile": 99.9, "bins": 2048, "axis": None}
