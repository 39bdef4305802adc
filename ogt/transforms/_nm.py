"""N:M sparsity arithmetic shared by prune-nm, pack-nm and ``ogt inspect``: pure numpy, no graph.

A weight is viewed as **rows x reduction**: a 2-D array whose last axis is the axis a layer sums
over, split into consecutive groups of ``m``. N:M sparse means every group has at most ``n``
non-zeros. The views (:func:`to_rows` / :func:`from_rows`):

- Conv ``W[Co, Ci/g, kh, kw]``: reduction = input channels, one row per (output channel, kernel
  position): ``W.transpose(0, 2, 3, 1).reshape(-1, Ci/g)`` -- what TensorRT's sparse convolution
  expects (groups of 4 input channels at a fixed kernel position, not across positions).
- MatMul ``W[K, N]`` and Gemm with ``transB=0``: rows = output features, ``W.T``.
- Gemm with ``transB=1`` ``W[N, K]``: as is.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight maps to rows x reduction. ``kind``: ``conv`` | ``kn`` (``W[K, N]``) | ``nk`` (``W[N, K]``)."""

    kind: str
    shape: tuple[int, ...]
    group: int = 1

    @property
    def reduction(self) -> int:
        return self.shape[1] if self.kind in ("conv", "nk") else self.shape[0]

    @property
    def outputs(self) -> int:
        return self.shape[0] if self.kind in ("conv", "nk") else self.shape[1]


def to_rows(w: np.ndarray, layout: Layout) -> np.ndarray:
    if layout.kind == "conv":
        return np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
    if layout.kind == "kn":
        return w.T
    return w


def from_rows(rows: np.ndarray, layout: Layout) -> np.ndarray:
    if layout.kind == "conv":
        co, ci = layout.shape[0], layout.shape[1]
        return np.ascontiguousarray(np.moveaxis(rows.reshape((co, *layout.shape[2:], ci)), -1, 1))
    if layout.kind == "kn":
        return np.ascontiguousarray(rows.T)
    return np.ascontiguousarray(rows)


def channel_scale_rows(norm: np.ndarray, layout: Layout) -> np.ndarray:
    """Per-input-channel activation norms laid out like :func:`to_rows` (broadcast over rows)."""
    if layout.kind != "conv":
        return norm.reshape(1, -1)
    co, ci = layout.shape[0], layout.shape[1]
    per_group = norm.reshape(layout.group, ci)  # input channel g*ci + c feeds group g
    rows = per_group[np.arange(co) // (co // layout.group)]  # [co, ci]
    spatial = int(np.prod(layout.shape[2:], dtype=np.int64))
    return np.repeat(rows, spatial, axis=0)


def group_nonzeros(rows: np.ndarray, m: int) -> np.ndarray:
    """Non-zeros per group of ``m`` along the last axis: shape ``[rows, K // m]``."""
    r, k = rows.shape
    return np.count_nonzero(rows.reshape(r, k // m, m), axis=2)


def is_nm(rows: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive values along the last axis has at most ``n`` non-zeros."""
    return rows.shape[-1] % m == 0 and bool((group_nonzeros(rows, m) <= n).all())


def compliant_fraction(rows: np.ndarray, n: int, m: int) -> float:
    """Fraction of groups with at most ``n`` non-zeros (1.0 = N:M sparse)."""
    counts = group_nonzeros(rows, m)
    return float(np.mean(counts <= n)) if counts.size else 1.0


def nm_keep_mask(rows: np.ndarray, score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean mask of the values to keep: in each group of ``m`` with more than ``n`` non-zeros, the ``n``
    highest by ``score`` (ties: larger ``|w|``, then the lower position). Groups that already have at
    most ``n`` non-zeros are kept whole, so pruning twice changes nothing."""
    r, k = rows.shape
    g = k // m
    w = np.abs(rows.astype(np.float64)).reshape(r, g, m)
    s = np.broadcast_to(score, rows.shape).astype(np.float64).reshape(r, g, m)
    pos = np.broadcast_to(np.arange(m)[::-1], w.shape)  # larger key = lower position
    order = np.lexsort((pos, w, s), axis=-1)  # ascending: the last n are the best
    keep = np.zeros((r, g, m), dtype=bool)
    np.put_along_axis(keep, order[..., m - n :], True, axis=2)
    compliant = np.count_nonzero(w, axis=2) <= n
    keep |= compliant[..., None]
    return keep.reshape(r, k)


def prune_rows(rows: np.ndarray, score: np.ndarray, n: int, m: int) -> tuple[np.ndarray, int]:
    """``rows`` with the pruned values set to +0.0 (kept values untouched, bit for bit) and how many
    non-zeros were zeroed."""
    keep = nm_keep_mask(rows, score, n, m)
    out = np.where(keep, rows, np.zeros((), rows.dtype))
    zeroed = int(np.count_nonzero(rows)) - int(np.count_nonzero(out))
    return out, zeroed
