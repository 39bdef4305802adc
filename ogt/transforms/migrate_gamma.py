"""migrate-gamma: move LayerNorm's gamma into the layers that read it (Outlier Suppression).

Wei et al. (NeurIPS 2022) find that LayerNorm's gamma amplifies the activation outliers of
transformers; *Gamma Migration* takes it out of the tensor that gets quantized. With
``xhat = (x - mean) / sqrt(var + eps)`` over the last axis,

    h  = LN(x)  = gamma * xhat + beta
    h' = LN'(x) = xhat + beta / gamma          (gamma' = 1, beta' = beta / gamma)
    h  = gamma * h'

and every reader of ``h`` gets what it needs so that nothing downstream changes
(see :mod:`ogt.transforms._rescale` for the reader rules):

- MatMul ``h W``: reads ``h'`` with ``W' = diag(gamma) W`` (rows along the input dimension);
  Gemm likewise on ``B``'s rows (transB=0) or columns (transB=1);
- ``Mul(h, c)``, ``c`` constant: reads ``h'`` with ``c' = c * gamma``; Shape/Size read ``h'``;
- the residual Add of a post-LN block (``z = Add(h, y)``), any other reader linear in ``h`` and a
  graph output read ``h = Mul(h', gamma)``, one Mul inserted on that branch.

So every quantizable linear layer reads ``h'`` directly (Q/DQ goes in front of the MatMuls and
sees no gamma); only the float residual branch gets the Mul. The float model computes the same
function up to rounding.

Guards (each a Skip with its reason):

- near-zero gamma: channels with ``|gamma| < min_abs_gamma`` keep their gamma in the LayerNorm
  and only the others migrate: ``gamma = g_kept * g_moved`` with ``g_moved = gamma`` where
  ``|gamma| >= min_abs_gamma`` and 1 elsewhere (exact; ``beta / g_moved`` never divides by a
  tiny number). The count ``kept-channel`` says how many stayed;
- a reader that is not linear in ``h`` (Gelu, Softmax, another LayerNorm, ``h * h``): the
  LayerNorm is left alone;
- no MatMul/Gemm reader with a constant weight: nothing to migrate into (the last LayerNorm of
  an encoder feeding pooling and the graph output), left alone;
- a weight shared with a node that does not read ``h``: that layer gets a rescaled copy under a
  fresh name and the original stays for the other reader (``shared-weight-copied``);
- normalisation over more than the last axis, gamma or beta not constant: left alone.

Matches the LayerNormalization op and the decomposed pattern (:mod:`ogt.graph.patterns`). Run it
before smoothquant (smoothquant folds its own factors into gamma; a later migrate-gamma would
move them out again).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import ClassVar

import numpy as np

from ..errors import OgtError
from ..graph.model import Model
from ..graph.patterns import LayerNormMatch, layernorms
from ..graph.query import GraphIndex, TensorInfo, describe, infer_types
from ._base import Skip, Transform, TransformContext, TransformResult, counts_of, register
from ._rescale import (
    LayerNormPlan,
    Reject,
    apply_plans,
    check_width,
    classify_readers,
    count_readers,
    glob_excluder,
    layernorm_params,
    scale_readers,
)


@register
@dataclasses.dataclass(frozen=True)
class MigrateGamma(Transform):
    """Move LayerNorm gamma into the following MatMul/Gemm weights; restore it on residual branches.

    min_abs_gamma: channels with ``|gamma|`` below this keep their gamma in the LayerNorm.
    exclude: shell globs on node name or op type; a matching MatMul/Gemm keeps its weight and
        reads the restored ``h``.
    """

    name: ClassVar[str] = "migrate-gamma"
    min_abs_gamma: float = 1e-2
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.min_abs_gamma > 0 and np.isfinite(self.min_abs_gamma)):
            raise OgtError(f"migrate-gamma: min_abs_gamma must be a positive number, got {self.min_abs_gamma!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        idx = GraphIndex(model.graph)
        types = infer_types(model)
        counts: Counter[str] = Counter()
        plans: list[LayerNormPlan] = []
        skipped: list[Skip] = []
        for ln in layernorms(idx, model.array):
            node = idx.nodes[ln.anchor if ln.kind == "op" else ln.nodes[-1]]
            try:
                plan = self._plan(model, idx, types, ln)
            except Reject as r:
                skipped.append(Skip(node.name, _op(ln), f"{_what(ln, idx)}: {r}"))
                continue
            plans.append(plan)
            counts[f"layernorm-{ln.kind}"] += 1
            counts["kept-channel"] += int(np.count_nonzero(plan.gamma != 1))
            count_readers(counts, idx, plan.readers, plan.scaled)
        if plans:
            apply_plans(model, idx, plans, [])
        return TransformResult(model, bool(plans), counts_of(self.name, counts), skipped)

    def _plan(self, model: Model, idx: GraphIndex, types: dict[str, TensorInfo], ln: LayerNormMatch) -> LayerNormPlan:
        if not ln.over_last_axis(types.get(ln.x, TensorInfo(0, None)).rank):
            raise Reject(f"normalises axes {list(ln.axes)}, not only the last axis")
        if ln.gamma is None:
            raise Reject("has no gamma (it is 1): nothing to migrate")
        readers = classify_readers(idx, ln.output, glob_excluder(self.exclude))
        if not readers.linear:
            raise Reject(f"no MatMul/Gemm with a constant weight reads '{ln.output}': nothing to migrate gamma into")
        width = idx.constant_tensor(readers.linear[0].weight).dims[readers.linear[0].k_axis]
        gamma, beta, dtype = layernorm_params(model, idx, ln, int(width))
        check_width(idx, readers.linear, gamma.size)
        moved = (np.abs(gamma) >= self.min_abs_gamma) & (gamma != 1)
        if not moved.any():
            small = int(np.count_nonzero(np.abs(gamma) < self.min_abs_gamma))
            if small:
                raise Reject(f"every gamma entry is 1 or below min_abs_gamma={self.min_abs_gamma:g} ({small} near zero)")
            raise Reject("gamma is 1 on every channel (already migrated)")
        m = np.where(moved, gamma, 1.0)
        scaled = scale_readers(model, idx, readers, m, ln.output)
        return LayerNormPlan(ln, m, gamma / m, beta / m, dtype, readers, scaled)


def _op(ln: LayerNormMatch) -> str:
    return "LayerNormalization" if ln.kind == "op" else "LayerNorm (decomposed)"


def _what(ln: LayerNormMatch, idx: GraphIndex) -> str:
    return f"LayerNorm of '{ln.x}'" if ln.kind == "decomposed" else describe(idx.nodes[ln.anchor])
