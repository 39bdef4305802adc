"""qparams: pure functions; the rounding error bound |x - DQ(Q(x))| <= scale/2 inside the range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ogt.calib.qparams import MIN_SCALE, QScheme, compute_qparams, dequantize, fake_quantize, int_range, quantize

schemes = st.builds(
    QScheme, bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans(), narrow=st.booleans()
)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


def test_int_ranges():
    assert int_range(8, True) == (-128, 127)
    assert int_range(8, True, narrow=True) == (-127, 127)
    assert int_range(8, False) == (0, 255)
    assert int_range(4, True, narrow=True) == (-7, 7)
    assert int_range(2, False) == (0, 3)
    with pytest.raises(ValueError):
        QScheme(bits=9)


@given(schemes, finite, finite, st.integers(0, 2**31 - 1))
def test_rounding_error_is_at_most_half_a_step_inside_the_range(scheme, a, b, seed):
    lo, hi = min(a, b), max(a, b)
    scale, zp = compute_qparams(lo, hi, scheme)
    # the representable interval always contains [min(lo,0), max(hi,0)] (asymmetric/unsigned may round the ends)
    x = np.random.default_rng(seed).uniform(min(lo, 0.0), max(hi, 0.0), 256)
    q = quantize(x, scale, zp, scheme)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    rep_lo = (scheme.qmin - int(zp)) * float(scale)
    rep_hi = (scheme.qmax - int(zp)) * float(scale)
    inside = (x >= rep_lo) & (x <= rep_hi)
    err = np.abs(x - dequantize(q, scale, zp, scheme))
    assert np.all(err[inside] <= float(scale) / 2 * (1 + 1e-5) + 1e-9)


@given(schemes, finite, finite)
def test_zero_is_exact_and_range_is_covered(scheme, a, b):
    lo, hi = min(a, b), max(a, b)
    scale, zp = compute_qparams(lo, hi, scheme)
    assert float(scale) >= MIN_SCALE
    assert scheme.qmin <= int(zp) <= scheme.qmax
    assert fake_quantize(np.zeros(1), lo, hi, scheme)[0] == 0.0
    if scheme.symmetric and scheme.signed:
        assert int(zp) == 0
    span = (scheme.qmax - scheme.qmin) * float(scale)
    assert span >= (max(hi, 0) - min(lo, 0)) * (1 - 1e-5)


def test_zero_range_does_not_divide_by_zero():
    scale, zp = compute_qparams(0.0, 0.0, QScheme())
    assert np.isfinite(scale) and scale > 0 and zp == 0


def test_per_channel_broadcast_on_axis():
    scheme = QScheme(axis=1)
    w = np.array([[1.0, -8.0], [0.5, 4.0]])
    scale, zp = compute_qparams(w.min(axis=0), w.max(axis=0), scheme)
    assert scale.shape == (2,) and np.allclose(scale, [1.0 / 127, 8.0 / 127])
    back = dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme)
    assert np.all(np.abs(back - w) <= scale / 2 + 1e-7)
