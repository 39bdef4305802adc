"""Quantization parameters as pure functions of a range and a scheme.

For ``b`` bits the integer grid is ``[qmin, qmax]``: signed ``[-2^(b-1), 2^(b-1)-1]``
(narrow: ``[-(2^(b-1)-1), 2^(b-1)-1]``, the symmetric grid TensorRT uses), unsigned
``[0, 2^b-1]``. Bit widths below 8 are stored in int8/uint8 (restricted ranges) unless the
int4/uint4 storage types are asked for.

- symmetric: ``scale = max(|lo|, |hi|) / qmax_sym``, ``zero_point = 0`` (uint: mid-grid)
- asymmetric: the range is widened to contain 0, ``scale = (hi - lo) / (qmax - qmin)``,
  ``zero_point = round(qmin - lo / scale)`` clamped to the grid

so that ``|x - DQ(Q(x))| <= scale / 2`` for every ``x`` in ``[lo, hi]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Smallest scale ever produced (a constant tensor would otherwise give scale 0).
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**10


@dataclasses.dataclass(frozen=True)
class QScheme:
    """How one tensor is quantized."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow: bool = False
    axis: int | None = None  # per-channel axis, None = per-tensor

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[1]


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1 - (1 if narrow else 0)


def compute_qparams(lo, hi, scheme: QScheme) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero_point int32) for the range [lo, hi] (scalars or per-channel arrays)."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        if scheme.signed:
            half = min(-qmin, qmax)  # symmetric grid around 0
            scale = amax / half
            zp = np.zeros_like(scale)
        else:
            half = (qmax - qmin) // 2
            scale = amax / half
            zp = np.full_like(scale, qmin + half)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.maximum(scale, MIN_SCALE)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.maximum(scale, MIN_SCALE).astype(np.float32)
    return scale, zp.astype(np.int32)


def quantize(x: np.ndarray, scale, zero_point, scheme: QScheme) -> np.ndarray:
    """Round-half-to-even like onnxruntime's QuantizeLinear, clamped to the scheme's grid."""
    q = np.round(np.asarray(x, np.float64) / _bcast(scale, x, scheme)) + _bcast(zero_point, x, scheme)
    return np.clip(q, scheme.qmin, scheme.qmax).astype(np.int32)


def dequantize(q: np.ndarray, scale, zero_point, scheme: QScheme) -> np.ndarray:
    return ((q - _bcast(zero_point, q, scheme)) * _bcast(scale, q, scheme)).astype(np.float32)


def fake_quantize(x: np.ndarray, lo, hi, scheme: QScheme) -> np.ndarray:
    """DQ(Q(x)) with the parameters for [lo, hi]."""
    scale, zp = compute_qparams(lo, hi, scheme)
    return dequantize(quantize(x, scale, zp, scheme), scale, zp, scheme)


def _bcast(v, x: np.ndarray, scheme: QScheme) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.ndim == 0 or scheme.axis is None:
        return v
    shape = [1] * np.ndim(x)
    shape[scheme.axis] = v.size
    return v.reshape(shape)
