"""The one tolerance table used by every equivalence check.

Two arrays agree when ``|a - b| <= atol * max(1, peak) + rtol * |b|`` element-wise, where
``peak = max |b|`` over the tensor: ``atol`` is relative to the tensor's own scale, so deep
networks with large activations are judged as strictly as small ones. Integer and boolean
tensors must match exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(np.float64): Tolerance(rtol=1e-9, atol=1e-12),
    np.dtype(np.float32): Tolerance(rtol=1e-4, atol=1e-5),
    np.dtype(np.float16): Tolerance(rtol=1e-2, atol=1e-3),
}
EXACT = Tolerance(0.0, 0.0)


def tolerance_for(dtype: np.dtype) -> Tolerance:
    return TOLERANCES.get(np.dtype(dtype), EXACT if np.dtype(dtype).kind in "biuU" else Tolerance(2e-2, 1e-2))


@dataclasses.dataclass(frozen=True)
class Comparison:
    ok: bool
    max_abs: float
    peak: float
    worst_index: tuple[int, ...] | None
    tolerance: Tolerance

    def describe(self) -> str:
        return (
            f"max |a-b| = {self.max_abs:.3g} at {self.worst_index} (peak |ref| = {self.peak:.3g}; "
            f"rtol={self.tolerance.rtol:g}, atol={self.tolerance.atol:g} x max(1, peak))"
        )


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance | None = None) -> Comparison:
    tol = tolerance or tolerance_for(expected.dtype)
    a = np.asarray(actual)
    b = np.asarray(expected)
    if a.shape != b.shape:
        return Comparison(False, float("inf"), float("nan"), None, tol)
    if b.size == 0:
        return Comparison(True, 0.0, 0.0, None, tol)
    if b.dtype.kind not in "fc":
        diff = (a != b).astype(np.float64)
        worst = np.unravel_index(int(np.argmax(diff)), b.shape)
        return Comparison(not diff.any(), float(diff.max()), 0.0, tuple(int(i) for i in worst), tol)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = np.abs(a64 - b64)
    finite = np.isfinite(b64)
    peak = float(np.abs(b64[finite]).max()) if finite.any() else 0.0
    bound = tol.atol * max(1.0, peak) + tol.rtol * np.abs(b64)
    same_nonfinite = ~finite & (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    bad = (err > bound) & ~same_nonfinite | (np.isfinite(a64) != finite)
    err_f = np.where(same_nonfinite, 0.0, err)
    worst = np.unravel_index(int(np.nanargmax(err_f)), b.shape)
    return Comparison(not bad.any(), float(np.nanmax(err_f)), peak, tuple(int(i) for i in worst), tol)
