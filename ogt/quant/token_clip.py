"""Token-wise clipping (Outlier Suppression, Wei et al., NeurIPS 2022), without gradients.

Transformer activations carry their outliers in a few tokens. The coarse stage looks at tokens,
not values: for every activation quantizer it gathers, over all calibration tokens (a token is
one vector along the tensor's last axis), the histogram of per-token maxima and of per-token
minima. For a ratio ``alpha`` the clipping range is ``[q_{1-alpha}(token minima),
q_alpha(token maxima)]``: the range that leaves a fraction ``1 - alpha`` of the tokens' extremes
outside. One ``alpha`` serves the whole model; it is searched on a grid, each candidate scored
by the mean squared error of the model's outputs against float with every activation quantized
at that ``alpha`` (onnxruntime runs the scoring on ``samples`` calibration samples).

The fine stage (``ogt.quant.refine``) then moves each weighted layer's input range, layer by
layer, to minimise that layer's output error: the paper fine-tunes the ranges by gradient
descent on block outputs, ogt searches a grid.

Padding is not a token: when the batch has an attention mask (``ogt.quant.tokens``), positions
it marks 0 are left out of the token statistics, and the fine stage weighs them 0 in its block
error. Nothing downstream reads a padded position, and on the benchmarks' sentences two thirds of
all positions are padding. Measured on paraphrase-MiniLM-L3 (embedding cosine mean / worst,
64 calibration and 256 evaluation sentences), token-clip at W6A6: every position counted
0.9819 / 0.9726, real tokens only 0.9846 / 0.9762 (W8A6: 0.9849 / 0.9726 -> 0.9890 / 0.9780).

Memory is two fixed-size histograms per tensor, whatever the number of calibration samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ..calib.data import CalibrationSource, limit
from ..calib.observers import PercentileObserver, _quantile
from ..calib.table import CalibrationTable, TensorRange
from ..graph.model import Model
from ..testing.equivalence import Runner
from .insert_qdq import InsertQDQ
from .refine import TunableQDQ, output_error, reference_outputs
from .tokens import real_tokens, token_mask

DEFAULT_ALPHAS = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)


class TokenExtremes:
    """Streaming histograms of per-token maxima and minima of one tensor (a tap for calibrate)."""

    wants_batch = True  # calibrate passes the batch: padded positions are not tokens

    def __init__(self, bins: int = 2048, token_weights: bool = True):
        self.maxima = PercentileObserver(bins=bins)  # its histogram; the quantiles are read below
        self.minima = PercentileObserver(bins=bins)
        self.token_weights = token_weights

    def __call__(self, x: np.ndarray, batch: Mapping[str, np.ndarray] | None = None) -> None:
        if batch is not None and self.token_weights:
            x = real_tokens(x, token_mask(batch))  # [real tokens, ..., channels]
        rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows):
            self.maxima.update(rows.max(axis=1))
            self.minima.update(rows.min(axis=1))

    @property
    def observed(self) -> bool:
        return self.maxima.observed

    def clip_range(self, alpha: float) -> tuple[float, float]:
        """``(q_{1-alpha}(token minima), q_alpha(token maxima))``; alpha 1 gives the observed extremes."""
        hi_h, lo_h = self.maxima._channel(0), self.minima._channel(0)
        if alpha >= 1.0:
            return lo_h.min, hi_h.max
        hi = _quantile(hi_h.counts, -hi_h.bins * hi_h.width, hi_h.width, alpha)
        lo = _quantile(lo_h.counts, -lo_h.bins * lo_h.width, lo_h.width, 1.0 - alpha)
        return float(min(max(lo, lo_h.min), hi_h.max)), float(max(min(hi, hi_h.max), lo_h.min))


def token_taps(names: Sequence[str], bins: int = 2048) -> dict[str, TokenExtremes]:
    return {n: TokenExtremes(bins) for n in names}


@dataclasses.dataclass(frozen=True)
class AlphaSearch:
    alpha: float
    scores: dict[float, float]  # alpha -> output MSE


def table_at(table: CalibrationTable, taps: Mapping[str, TokenExtremes], alpha: float) -> CalibrationTable:
    """``table`` with every tapped tensor's range set to its token-wise range at ``alpha``."""
    ranges = dict(table.ranges)
    for name, tap in taps.items():
        if name in ranges and tap.observed:
            r = ranges[name]
            lo, hi = tap.clip_range(alpha)
            ranges[name] = TensorRange(name, lo, hi, r.min, r.max, r.samples)
    return CalibrationTable(table.fingerprint, "token-clip", table.samples, ranges,
                            {**table.options, "token_clip_alpha": alpha})


def search_alpha(
    reference: Model,
    table: CalibrationTable,
    taps: Mapping[str, TokenExtremes],
    source: CalibrationSource,
    insert: InsertQDQ,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    samples: int = 8,
    run_ref: Runner | None = None,
) -> tuple[CalibrationTable, AlphaSearch]:
    """The coarse stage: the one ``alpha`` whose quantized model's outputs are closest to float.
    ``run_ref``: a session over ``reference`` to reuse (any extra outputs it exposes are ignored)."""
    batches = list(limit(source, samples))
    expected = reference_outputs(run_ref or Runner(reference), reference, batches)
    work = TunableQDQ(reference, table, insert)  # one session scores every alpha
    run = Runner(work.model)
    scores: dict[float, float] = {}
    for alpha in alphas:
        feeds = work.values(table_at(table, taps, alpha).ranges)
        _, err, count = output_error(lambda b: run({**b, **feeds}), batches, expected)
        scores[float(alpha)] = err / max(count, 1)
    best = min(scores, key=lambda a: (scores[a], -a))  # ties: the wider range
    return table_at(table, taps, best), AlphaSearch(best, scores)


__all__ = ["AlphaSearch", "DEFAULT_ALPHAS", "TokenExtremes", "search_alpha", "table_at", "token_taps"]
