"""Which token positions count: padding-aware squared errors for transformer objectives.

Batches of sentences are padded to a common length, and on short sentences most positions are
padding (the MiniLM calibration sentences of the benchmarks: 66% of positions). A BERT-style
encoder still computes every padded position, but nothing downstream reads it: attention masks
padded keys and the pooling averages real tokens only. An objective that sums squared errors over
all positions spends most of its weight on values that cannot change the output. The block
objectives (token-clip's fine stage, noisy bias) therefore weight each position by the attention
mask when the batch has one: a 2-D input whose name contains "mask" (``attention_mask``), read as
``[batch, sequence]``, applied to any tensor whose first two dimensions are ``[batch, sequence]``.
Tensors of other shapes (attention scores ``[batch, heads, seq, seq]``, pooled outputs) and
batches without a mask count every element, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def token_mask(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """``[batch, sequence]`` weights (1 real token, 0 padding) from the batch's attention mask, or None."""
    for name in sorted(batch):
        v = np.asarray(batch[name])
        if "mask" in name.lower() and v.ndim == 2 and v.dtype.kind in "biuf":
            return (v != 0).astype(np.float64)
    return None


def real_tokens(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``x[mask]`` (``[real tokens, ...]``) when ``x`` is laid out ``[batch, sequence, ..., channels]``
    with at least one axis after the sequence; otherwise ``x`` unchanged."""
    if mask is None or x.ndim < 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask.astype(bool)]


def weighted_sq(a: np.ndarray, mask: np.ndarray | None) -> float:
    """``sum(a**2)``, each position weighted by ``mask`` when ``a`` is laid out ``[batch, sequence, ...]``."""
    a = np.asarray(a, np.float64)
    if mask is None or a.ndim < 2 or a.shape[:2] != mask.shape:
        return float((a**2).sum())
    w = mask.reshape(mask.shape + (1,) * (a.ndim - 2))
    return float(((a**2) * w).sum())


__all__ = ["real_tokens", "token_mask", "weighted_sq"]
