"""smoothquant: migrate activation outliers into the weights of the following linear layers.

SmoothQuant (Xiao et al., ICML 2023). For a linear layer ``Y = X W`` (``X`` of shape
``(..., K)``, ``W`` of shape ``(K, N)``) and per-input-channel factors ``s`` (``K``,)::

    Y = (X diag(s)^-1) (diag(s) W) = X' W'
    s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)

``max|X_k|`` comes from calibration data (:mod:`ogt.calib.channel_absmax`), the weight maximum
from the weight itself. The activation ``X'`` then has flatter channels (easier per-tensor int8)
and the weight absorbs the difference (it is quantized per output channel). Exact in float.

Readers of one tensor ``X`` share one ``s`` (Q/K/V after a LayerNorm): ``max_n |W_kn|`` is taken
over all their weights. Where ``X'`` comes from:

- ``X`` is the output of a LayerNorm (op or decomposed) whose other readers are all linear in
  it: the LayerNorm is folded, ``gamma' = gamma / s``, ``beta' = beta / s``; a residual Add (or
  graph output) reading ``X`` gets ``X = Mul(X', s)`` inserted on its branch, as in
  migrate-gamma (see :mod:`ogt.transforms._rescale`);
- anywhere else (attention output, the FFN's second MatMul after Gelu): ``X' = Mul(X, 1/s)`` is
  inserted in front of the linear readers; other readers keep ``X``.

alpha: a float in [0, 1] (default 0.5) for every layer, or ``"auto"``: per tensor, each alpha in
``alphas`` is scored on sampled calibration rows by the output MSE of its linear readers after
fake-quantizing ``X'`` per-tensor symmetric at ``act_bits`` (range from the calibration maximum)
and ``W'`` per-output-channel symmetric at ``weight_bits`` (numpy; both 8 unless given: ``ogt
quantize`` passes its widths, so at W4A8 an alpha that moves outliers into 4-bit weights loses);
the best wins, and if no smoothing at all scores better the tensor is skipped with both errors in
the reason. Positions an attention mask marks as padding count in neither the channel maxima nor
the sampled rows.

Skipped with a reason: a tensor whose factors are all within ``min_change`` of 1 (already
smooth; this makes a second run with the same alpha a no-op), linear readers of different
widths, a reader excluded by ``exclude`` (globs on node name or op type; it keeps reading ``X``).
Needs calibration data: ``SmoothQuant(data=batches)`` with ``batches`` an iterable of
``{input_name: array}`` (read once per run: pass a list or a re-iterable CalibrationSource if
the same data serves calibration afterwards). Run after migrate-gamma.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np

from ..calib.channel_absmax import ChannelAbsMax, collect_channel_absmax
from ..errors import OgtError, TransformError
from ..graph.model import Model
from ..graph.patterns import LayerNormMatch, layernorms
from ..graph.query import GraphIndex, TensorInfo, describe, infer_types
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register
from ._rescale import (
    InsertPlan,
    LayerNormPlan,
    LinearReader,
    Readers,
    Reject,
    apply_plans,
    classify_readers,
    count_readers,
    glob_excluder,
    layernorm_params,
    linear_reader,
    scale_readers,
    weight_channels,
)

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SCALE_LIMITS = (1e-5, 1e5)


@register
@dataclasses.dataclass(frozen=True)
class SmoothQuant(Transform):
    """Per-channel smoothing of linear-layer inputs into their weights (needs calibration ``data``).

    data: calibration batches ``{input_name: array}`` (any iterable; read once per run).
    alpha: migration strength in [0, 1], or ``"auto"`` to search ``alphas`` per tensor.
    exclude: shell globs on node name or op type of linear layers to leave alone.
    search_rows: rows of each tensor sampled for the alpha search.
    min_change: factors within this of 1 count as no change.
    """

    name: ClassVar[str] = "smoothquant"
    data: Iterable[Mapping[str, np.ndarray]] | None = dataclasses.field(default=None, repr=False, compare=False)
    alpha: float | str = 0.5
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    exclude: tuple[str, ...] = ()
    search_rows: int = 512
    min_change: float = 1e-3
    weight_bits: int = 8  # widths the alpha search quantizes at
    act_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise OgtError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise OgtError(f"smoothquant: alpha must be in [0, 1], got {self.alpha!r}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise OgtError(f"smoothquant: alphas must be numbers in [0, 1], got {self.alphas!r}")
        if self.search_rows < 1:
            raise OgtError("smoothquant: search_rows must be at least 1")
        for what in ("weight_bits", "act_bits"):
            if not 2 <= getattr(self, what) <= 16:
                raise OgtError(f"smoothquant: {what} must be in 2..16, got {getattr(self, what)!r}")

    def preconditions(self, model: Model) -> None:
        if self.data is None:
            raise TransformError(
                "smoothquant needs calibration data: in Python, ogt.SmoothQuant(data=batches) with batches "
                "an iterable of {input_name: array} (e.g. ogt.calib.data.npz_source(path)); "
                "the command line has no option for it"
            )

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        idx = GraphIndex(model.graph)
        types = infer_types(model)
        excluded = glob_excluder(self.exclude)
        groups, skipped = _groups(idx, excluded)
        search = self.alpha == "auto"
        stats = collect_channel_absmax(model, self.data, list(groups), keep_rows=self.search_rows if search else 0)
        ln_of = {ln.output: ln for ln in layernorms(idx, model.array)}
        counts: Counter[str] = Counter()
        ln_plans: list[LayerNormPlan] = []
        inserts: list[InsertPlan] = []
        for x, linear in groups.items():
            first = idx.nodes[linear[0].node]
            try:
                s = self._factors(model, idx, linear, stats[x])
                plan = _plan(model, idx, types, x, linear, s, ln_of.get(x), excluded)
            except Reject as r:
                skipped.append(Skip(first.name, first.op_type, f"input '{x}': {r}"))
                continue
            if isinstance(plan, LayerNormPlan):
                ln_plans.append(plan)
                counts["layernorm"] += 1
            else:
                inserts.append(plan)
                counts["mul"] += 1
            count_readers(counts, idx, plan.readers, plan.scaled)
        if ln_plans or inserts:
            apply_plans(model, idx, ln_plans, inserts)
        return TransformResult(model, bool(ln_plans or inserts), counts_of(self.name, counts), skipped)

    def _factors(self, model: Model, idx: GraphIndex, linear: list[LinearReader], st: ChannelAbsMax) -> np.ndarray:
        ws = [weight_channels(model, idx, lin) for lin in linear]
        widths = {w.shape[0] for w in ws}
        if len(widths) != 1 or st.absmax.size not in widths:
            raise Reject(f"linear readers have input widths {sorted(widths)}, the tensor has {st.absmax.size} channels")
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        if self.alpha == "auto":
            alpha, s = _search(st, ws, wmax, self.alphas, self.weight_bits, self.act_bits)
        else:
            alpha, s = float(self.alpha), factors(st.absmax, wmax, float(self.alpha))
        if np.all(np.abs(s - 1.0) <= self.min_change):
            raise Reject(f"smoothing factors are within {self.min_change:g} of 1 (already smooth)")
        log.info("smoothquant: %s alpha=%s factors in [%.3g, %.3g]", describe(idx.nodes[linear[0].node]), alpha, s.min(), s.max())
        return s


def factors(absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s = absmax^alpha / wmax^(1 - alpha)``, 1 where either is 0, clipped to SCALE_LIMITS."""
    ok = (absmax > 0) & (wmax > 0) & np.isfinite(absmax)
    a = np.where(ok, absmax, 1.0)
    w = np.where(ok, wmax, 1.0)
    s = np.where(ok, a**alpha / w ** (1.0 - alpha), 1.0)
    return np.clip(s, *SCALE_LIMITS)


def levels(bits: int) -> int:
    """The largest magnitude of a narrow symmetric signed grid: 127 at 8 bits, 7 at 4."""
    return 2 ** (bits - 1) - 1


def quantized_error(rows: np.ndarray, ws: list[np.ndarray], absmax: np.ndarray, s: np.ndarray,
                    refs: list[np.ndarray] | None = None, weight_bits: int = 8, act_bits: int = 8) -> float:
    """Output MSE of ``X W`` against fake-quantized ``(X / s)`` (per tensor, ``act_bits``) times
    ``(s W)`` (per column, ``weight_bits``), both symmetric.

    refs: the float outputs ``X W`` when already computed (the search reuses them).
    """
    qa, qw = levels(act_bits), levels(weight_bits)
    x = rows.astype(np.float32)
    xs = x / s.astype(np.float32)
    step = np.float32(max(float(np.max(absmax / s)), 1e-30) / qa)
    xq = np.clip(np.round(xs / step), -qa, qa) * step
    err = 0.0
    for k, w in enumerate(ws):
        ww = w * s[:, None]
        wstep = np.maximum(np.abs(ww).max(axis=0), 1e-30) / qw
        wq = (np.round(ww / wstep) * wstep).astype(np.float32)
        ref = refs[k] if refs is not None else x @ w.astype(np.float32)
        err += float(np.mean(np.square(xq @ wq - ref, dtype=np.float64)))
    return err


def _search(st: ChannelAbsMax, ws: list[np.ndarray], wmax: np.ndarray, alphas: tuple[float, ...],
            weight_bits: int = 8, act_bits: int = 8) -> tuple[float, np.ndarray]:
    if st.rows.shape[0] == 0:
        raise Reject("no calibration rows to search alpha on")
    refs = [st.rows.astype(np.float32) @ w.astype(np.float32) for w in ws]

    def error(s: np.ndarray) -> float:
        return quantized_error(st.rows, ws, st.absmax, s, refs, weight_bits, act_bits)

    base = error(np.ones_like(st.absmax))
    scored = [(error(factors(st.absmax, wmax, a)), a) for a in alphas]
    err, alpha = min(scored)
    if not err < base:
        raise Reject(f"no alpha in {list(alphas)} lowers the W{weight_bits}A{act_bits} output error (best {err:.4g} "
                     f"at alpha={alpha}, unsmoothed {base:.4g})")
    return alpha, factors(st.absmax, wmax, alpha)


def _groups(idx: GraphIndex, excluded) -> tuple[dict[str, list[LinearReader]], list[Skip]]:
    """Linear layers with a constant weight, grouped by the activation they read (graph order)."""
    groups: dict[str, list[LinearReader]] = {}
    skipped: list[Skip] = []
    for i, node in enumerate(idx.nodes):
        if not node.input or idx.is_constant(node.input[0]):
            continue
        lin = linear_reader(idx, i, node.input[0])
        if lin is None:
            continue
        if excluded(node):
            skipped.append(Skip(node.name, node.op_type, "excluded by a glob"))
            continue
        groups.setdefault(node.input[0], []).append(lin)
    return groups, skipped


def _plan(model: Model, idx: GraphIndex, types: dict[str, TensorInfo], x: str, linear: list[LinearReader],
          s: np.ndarray, ln: LayerNormMatch | None, excluded) -> LayerNormPlan | InsertPlan:
    dtype = model.array(idx.constant_tensor(linear[0].weight)).dtype
    if ln is not None and ln.over_last_axis(types.get(ln.x, TensorInfo(0, None)).rank):
        try:
            readers = classify_readers(idx, x, excluded)
            gamma, beta, ln_dtype = layernorm_params(model, idx, ln, s.size)
        except Reject as r:
            log.info("smoothquant: not folding into the LayerNorm producing '%s' (%s); inserting a Mul", x, r)
        else:
            scaled = scale_readers(model, idx, readers, s, x)
            return LayerNormPlan(ln, s, gamma / s, beta / s, ln_dtype, readers, scaled)
    readers = Readers(list(linear), [], [], [], False)
    return InsertPlan(x, s, dtype, readers, scale_readers(model, idx, readers, s, x))
