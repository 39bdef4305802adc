"""noisy-bias: NoisyQuant's fixed noise before an activation quantizer, removed through the next bias.

NoisyQuant (Liu et al., CVPR 2023): adding a fixed noise vector ``N`` (one value per input
channel, drawn once) to an activation ``x`` before it is quantized lowers the quantization error
of heavy-tailed activations, and the next linear layer removes the noise exactly through its
bias::

    y = Q(x + N) W_q + (b - N W_q)

Without quantization (``Q`` = identity) this is ``x W_q + b``: the rewritten graph computes what
the original computes. ``W_q`` is the weight exactly as the graph multiplies it (the dequantized
int8 weight), so the only thing that changes is how ``x + N`` rounds.

For each activation quantizer ``x -> [Clip] -> Q -> DQ`` whose dequantized output is read only
by linear layers (MatMul with a constant weight, Gemm with ``transA=0``, Conv without padding:
with padding the border outputs would see zero padding, not noise, and ``-N W`` would be
inexact), with step ``s`` (the quantizer's scale)::

    N_c = s * (shift + amplitude * u_c),   u_c ~ U(-0.5, 0.5), drawn once per tensor from ``seed``

``amplitude`` and ``shift`` (both in units of ``s``) are searched on a grid to minimise the
layers' relative output error against the float model on ``samples`` calibration samples:

    sum over readers c of ||c(DQ(Q(x + N)), W_q) - N W_q - c(x, W)||^2 / ||c(x, W)||^2

each candidate run in one small onnxruntime model (the exact Clip/Q/DQ of ``x`` with its scale
and zero point, the readers with their quantized weights and biases; ``x`` and the reference
from the float model). A layer keeps the best candidate when it lowers that error by at least
``min_gain`` (relative); otherwise it keeps no noise and the report says so.

``objective``: what a candidate is scored on. ``"layer"`` is the readers' error above.
``"block"`` (the default when the model has a LayerNorm) scores the output of the quantizer's
*block* instead, as refine's block objective does: the nodes from ``x`` to the next LayerNorm
output (or to the graph outputs when none follows), run alone in onnxruntime, fed with the
tensors entering the block as the quantized model computes them (noise already kept upstream
included), against the float model's block output (relative squared error). The noise ``N`` and
each reader's bias change ``-N W_q`` are inputs of that block model (``Add(x, N)`` before the
Clip/Q, ``Add(y, -N W_q)`` after each reader), so one session serves every candidate. Both
objectives score the bias change as the rewrite stores it: rounded to the int32 bias step
``s_x s_w`` where the bias is int32 (``--target ort``); at 4-bit activations that rounding is
not negligible on narrow layers, and an unrounded score could keep noise that makes the graph
worse. ``"output"`` is the block objective with one block, ``x`` to the graph outputs
(slower; what a model without LayerNorm gets with ``"block"`` too).

With the block and output objectives the winner (best of 16 candidates) must lower the error by
``min_gain`` on the ``samples`` search samples *and* on the next ``samples`` calibration samples
(``holdout``): on MiniLM-L3 at W8A4 a winner chosen on 8 samples lowered its block error on them
and on 8 held-out ones, yet lowered the end cosine on the 256 evaluation sentences; with 16 + 16
samples (the default for these objectives; 8 for the layer objective) it is declined. The
layer objective proved a poor proxy on MiniLM-L3: every kept layer's own error fell, yet the
end cosine fell at W8A4 percentile, because a layer's error says nothing about how it adds up
with the residual and the next quantizers. The report keeps the layer error of the chosen
candidate in both modes (``error_before``/``error_after``) and, for the block objective, the
block error (``block_error_before``/``block_error_after``) that decided.

Decisions:

- the quantizer's scale and zero point stay as calibrated. ``x + N`` may reach up to
  ``(|shift| + amplitude / 2)`` steps beyond the calibrated range and be clipped there; the
  search scores exactly that, clipping included, so a candidate that clips too much loses.
- where ``-N W`` goes: a Conv/Gemm bias (float, or for ``--target ort`` the int32 bias behind its
  DequantizeLinear, re-rounded: ``round((b - N W_q) / (s_x s_w))``; created when missing), the
  constant of the bias Add after a MatMul, or a new Add after a MatMul without one (it takes
  over the MatMul's output name, so every reader still sees the layer's float output).
- ``--target tensorrt``: when ``x`` is the output of a layer with a bias (Conv, Gemm, or an Add
  with a constant such as MatMul + bias) read by nothing but the quantizer, ``N`` is folded into
  that bias: no extra op. Otherwise an ``Add(x, N)`` stays before the Q, and the report lists
  the layer as "extra elementwise op" (TensorRT runs it as a separate pointwise kernel unless it
  fuses it into the producer). Note that a folded producer's own output now carries ``N``, so
  its row in the quantize layer table measures ``N`` as error.
- a second run leaves quantizers already examined alone (recorded, when anything changed, under
  the model metadata key ``ogt.noisy-bias``, by QuantizeLinear node name).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..calib.collect import plan_groups
from ..calib.data import CalibrationSource, batch_len, limit
from ..errors import TransformError
from ..graph.model import Model
from ..graph.patterns import layernorms
from ..graph.query import GraphIndex, infer_types
from ..testing.equivalence import Runner
from ..transforms._base import (
    Skip,
    Transform,
    TransformContext,
    TransformResult,
    counts_of,
    register,
)
from ._noise_sites import Linear, Site, dequantized, find_sites, rewrite
from .refine import _block, _boundary
from .tokens import real_tokens, token_mask, weighted_sq

METADATA_KEY = "ogt.noisy-bias"


@dataclasses.dataclass(frozen=True)
class NoisyLayer:
    """What the search decided for one activation quantizer (errors: relative squared error of its readers)."""

    tensor: str
    layers: tuple[str, ...]
    kept: bool
    amplitude: float  # in quantizer steps (0 when not kept)
    shift: float
    step: float
    error_before: float
    error_after: float
    placement: str  # "add", "bias of <node>", or "none"
    note: str = ""
    objective: str = "layer"  # what decided: "layer" (error_*) or "block" (block_error_*)
    block_error_before: float | None = None
    block_error_after: float | None = None
    per_channel: bool = False  # the kept noise is the per-channel candidate (amplitude: its spread, shift: its mean)

    @property
    def gain_db(self) -> float:
        if self.error_after <= 0 or self.error_before <= 0:
            return 0.0
        return float(10 * np.log10(self.error_before / self.error_after))

    @property
    def block_gain_db(self) -> float | None:
        b, a = self.block_error_before, self.block_error_after
        if b is None or a is None or a <= 0 or b <= 0:
            return None
        return float(10 * np.log10(b / a))

    def as_dict(self) -> dict:
        g = self.block_gain_db
        return {**dataclasses.asdict(self), "gain_db": round(self.gain_db, 4),
                "block_gain_db": None if g is None else round(g, 4)}


@dataclasses.dataclass
class NoisyBiasResult(TransformResult):
    """A TransformResult that also carries the per-quantizer search results."""

    layers: list[NoisyLayer] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "layers": [x.as_dict() for x in self.layers]}


@dataclasses.dataclass(frozen=True)
class NoisyBiasOptions:
    """The search settings of noisy-bias, as ``ogt quantize --noisy-bias`` passes them on."""

    seed: int = 0
    amplitudes: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # in quantizer steps
    shifts: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25)  # in quantizer steps
    samples: int | None = None  # search samples; None: 16 for the block/output objectives, 8 for layer
    include: tuple[str, ...] = ("*",)  # globs on the linear layers' node names or op types
    exclude: tuple[str, ...] = ()
    min_gain: float = 0.02  # relative error reduction a layer needs to keep its noise
    objective: str | None = None  # "layer" | "block"; None: "block" when the model has a LayerNorm
    holdout: bool = True  # block objective: confirm the chosen candidate on the next `samples` samples
    draws: int = 0  # >0: also a per-channel candidate, each channel the best of this many draws per (amplitude, shift)
    token_weights: bool = True  # block/output objectives: padded positions (attention mask 0) count nothing

    def transform(self, reference: Model, data, target: str = "ort") -> NoisyBias:
        return NoisyBias(reference=reference, data=data, target=target, **dataclasses.asdict(self))


@register
@dataclasses.dataclass(frozen=True)
class NoisyBias(Transform):
    """Add searched fixed noise before activation quantizers that feed linear layers (module docstring).

    ``reference``: the float model the QDQ model was made from (same tensor names).
    ``data``: a CalibrationSource or a re-iterable sequence of input batches.
    """

    name: ClassVar[str] = "noisy-bias"
    reference: Model | None = None
    data: CalibrationSource | Sequence[Mapping[str, np.ndarray]] | None = None
    target: str = "ort"
    seed: int = 0
    amplitudes: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    shifts: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25)
    samples: int | None = None  # search samples; None: 16 for the block/output objectives, 8 for layer
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    min_gain: float = 0.02
    objective: str | None = None  # "layer" | "block"; None: "block" when the reference has a LayerNorm
    holdout: bool = True  # block objective: confirm the chosen candidate on the next `samples` samples
    draws: int = 0  # >0: also a per-channel candidate, each channel the best of this many draws per (amplitude, shift)
    token_weights: bool = True  # block/output objectives: padded positions (attention mask 0) count nothing
    budget_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.objective not in (None, "layer", "block", "output"):
            raise ValueError(f"objective must be layer, block or output, got {self.objective!r}")
        if self.target not in ("ort", "tensorrt"):
            raise ValueError(f"target must be ort or tensorrt, got {self.target!r}")
        if not self.amplitudes or any(a < 0 for a in self.amplitudes):
            raise ValueError(f"amplitudes must be non-empty and >= 0, got {self.amplitudes}")
        if not self.shifts:
            raise ValueError("shifts must not be empty (use (0.0,) for no shift)")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.draws < 0:
            raise ValueError(f"draws must be >= 0, got {self.draws}")

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        done = set(_done(model))
        sites, skipped = find_sites(model, quantized=True, include=self.include, exclude=self.exclude,
                                    fold_into_producer=self.target == "tensorrt")
        fresh = [s for s in sites if model.graph.node[s.q].name not in done]
        for s in sites:
            if s not in fresh:
                n = model.graph.node[s.q]
                skipped.append(Skip(n.name, n.op_type, f"'{s.tensor}' already has a noisy bias"))
        if not fresh:
            return NoisyBiasResult(model, False, {}, skipped)
        if self.reference is None or self.data is None:
            raise TransformError("noisy-bias needs the float reference model and calibration data (reference=, data=)")
        present = set(infer_types(self.reference)) | {o for n in self.reference.graph.node for o in n.output}
        searchable = []
        for s in fresh:
            missing = [n for n in [s.tensor, *_outputs(model, s)] if n not in present]
            if missing:
                n = model.graph.node[s.q]
                skipped.append(Skip(n.name, n.op_type, f"'{missing[0]}' is not in the reference model"))
            else:
                searchable.append(s)
        ends = {m.output for m in layernorms(GraphIndex(self.reference.graph))}
        objective = self.objective or ("block" if ends else "layer")
        samples = self.samples or (8 if objective == "layer" else 16)
        batches = _batches(self.data, samples)
        n_search = len(batches)
        if objective == "output":  # one block: x to the graph outputs
            ends = set()
        block_refs = None
        all_batches = batches
        if objective in ("block", "output"):  # the float model's block outputs: every LayerNorm output and graph output
            graph_outputs = {o.name for o in model.graph.output}
            run_ref = Runner(self.reference, sorted((ends | graph_outputs) & present))
            if self.holdout:  # the next `samples` calibration samples confirm the chosen candidate
                all_batches = _batches(self.data, 2 * samples)
            block_refs = [run_ref(b) for b in all_batches]
            del run_ref  # a session holds its own copy of the weights: one at a time
        rows, kept, current = [], [], {model.graph.node[s.q].name: s for s in searchable}
        masks = [token_mask(b) if self.token_weights else None for b in batches]  # the search samples' padding
        groups = [[(model.graph.node[s.q].name, _outputs(model, s)) for s in g]
                  for g in _groups(model, searchable, batches, self.budget_bytes)]  # names: indices move on rewrite
        for group in groups:
            run_ref = Runner(self.reference, list(dict.fromkeys(n for _, outs in group for n in outs)))
            refs = [run_ref(b) for b in batches]
            del run_ref
            for qname, _ in group:
                site = current[qname]
                block = _BlockScorer.build(model, site, ends, all_batches, block_refs, n_search, self.token_weights) \
                    if block_refs is not None else None
                if block is not None:
                    block.objective = objective
                if block is not None:
                    values = [{**r, site.tensor: f[site.tensor]} for r, f in zip(refs, block.feeds)]
                else:  # x as the quantizer sees it: after the upstream quantization error and upstream noise
                    run_q = Runner(model, [site.tensor])
                    values = [{**r, site.tensor: run_q(b)[site.tensor]} for r, b in zip(refs, batches)]
                row, noise = self._search(model, site, values, block, masks)
                if noise is not None:
                    placement = rewrite(model, {site.tensor: (site, noise)}, int32_bias=self.target == "ort")
                    row = dataclasses.replace(row, placement=placement[site.tensor])
                    kept.append(qname)
                    current = self._sites_by_q(model)
                rows.append(row)
            del refs
        if not kept:
            return NoisyBiasResult(model, False, {"noisy-bias.declined": len(rows)}, skipped, layers=rows)
        _record(model, [q for g in groups for q, _ in g])  # every quantizer examined: a second run leaves them alone
        counts = Counter(kept=len(kept), declined=len(rows) - len(kept))
        counts["add"] = sum(r.kept and r.placement == "add" for r in rows)
        counts["folded-into-producer"] = len(kept) - counts["add"]
        if self.target == "tensorrt":
            for r in rows:
                if r.kept and r.placement == "add":
                    skipped.append(Skip(r.layers[0], "Add", f"extra elementwise op: Add(N) before the Q of '{r.tensor}' "
                                        "(its producer has no bias that could absorb N)"))
        return NoisyBiasResult(model, True, counts_of(self.name, counts), skipped, layers=rows)

    def _sites_by_q(self, model: Model) -> dict[str, Site]:
        sites, _ = find_sites(model, quantized=True, include=self.include, exclude=self.exclude,
                              fold_into_producer=self.target == "tensorrt")
        return {model.graph.node[s.q].name: s for s in sites}

    def _search(self, model: Model, site: Site, values: list[dict[str, np.ndarray]],
                block: _BlockScorer | None = None, masks: list | None = None) -> tuple[NoisyLayer, np.ndarray | None]:
        layer_names = tuple(model.graph.node[c.node].name for c in site.consumers)
        grids = _delta_grids(model, site, self.target == "ort")
        layer = _Scorer(model, site, values, grids)
        if block is not None:
            block.grids = grids
        score = block if block is not None else layer
        u = noise_pattern(self.seed, site.tensor, site.channels)
        zero = np.zeros(site.noise_shape, np.float32)
        before = score(zero)
        best, best_err = (0.0, 0.0), before
        candidates = {(a, sh): noise(site, u, a, sh) for a in self.amplitudes for sh in self.shifts if a or sh}
        if self.draws:
            picked = per_channel_noise(model, site, [v[site.tensor] for v in values], self.seed, self.draws,
                                       self.amplitudes, self.shifts, masks=masks)
            if picked is not None:
                candidates[PER_CHANNEL] = picked
        for key, cand in candidates.items():
            err = score(cand)
            if err < best_err:
                best, best_err = key, err
        step = float(site.step)
        objective = "layer" if block is None else block.objective
        layer_before = before if block is None else layer(zero)
        blk = {} if block is None else {"block_error_before": before}
        if best == (0.0, 0.0) or not best_err < before * (1 - self.min_gain):
            note = "noise did not lower the error" if best == (0.0, 0.0) else \
                f"best candidate lowered the {objective} error by {100 * (1 - best_err / before):.2f}% < min_gain {100 * self.min_gain:g}%"
            if block is not None:
                blk["block_error_after"] = before
            return NoisyLayer(site.tensor, layer_names, False, 0.0, 0.0, step, layer_before, layer_before, "none", note,
                              objective, **blk), None
        n = candidates[best]
        if best == PER_CHANNEL:  # described by its spread and mean, in steps
            a, sh = float(n.max() - n.min()) / step, float(n.mean()) / step
        else:
            a, sh = best
        if block is not None and block.has_holdout:  # the best of 16 candidates on a few samples may be luck
            held_before, held_after = block(zero, held=True), block(n, held=True)
            if not held_after < held_before * (1 - self.min_gain):
                note = (f"best candidate (block error -{100 * (1 - best_err / before):.2f}% on the search samples) "
                        f"did not lower it by min_gain on the held-out samples ({100 * (held_after / held_before - 1):+.2f}%)")
                return NoisyLayer(site.tensor, layer_names, False, 0.0, 0.0, step, layer_before, layer_before, "none",
                                  note, objective, before, before), None
        if block is not None:
            blk["block_error_after"] = best_err
        layer_after = best_err if block is None else layer(n)
        return NoisyLayer(site.tensor, layer_names, True, a, sh, step, layer_before, layer_after, "", "",
                          objective, **blk, per_channel=best == PER_CHANNEL), n


#: the key of the per-channel candidate among the (amplitude, shift) ones
PER_CHANNEL = "per-channel"


def per_channel_noise(model: Model, site: Site, xs: list[np.ndarray], seed: int, draws: int,
                      amplitudes: Sequence[float], shifts: Sequence[float], max_rows: int = 2048,
                      masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray | None:
    """Each channel's noise value chosen among ``{0} U {step (shift + amplitude u_k)}`` (every
    amplitude and shift of the grid, ``draws`` uniform draws ``u_k``, seeded): the one whose
    quantization error ``Q(x_c + N_c) - x_c - N_c`` over the search tokens is smallest for that
    channel. Every value is one the paper's noise could take; choosing per channel lines each
    channel's typical values up with the grid instead of leaving it to one draw. None when the
    quantizer's grid cannot be read."""
    grid = _grid(model, site)
    if grid is None or not xs:
        return None
    scale, zp, qmin, qmax = grid
    axis = xs[0].ndim - 1 - site.consumers[0].trailing
    parts = []
    for x, m in zip(xs, masks or [None] * len(xs)):
        r = np.moveaxis(x, axis, -1)
        if axis >= 2:  # channels after [batch, sequence]: real tokens only
            r = real_tokens(r, m)
        parts.append(r.reshape(-1, x.shape[axis]))
    rows = np.concatenate(parts).astype(np.float32)
    if len(rows) > max_rows:
        rows = rows[np.random.default_rng([seed, 1]).choice(len(rows), max_rows, replace=False)]
    rng = np.random.default_rng([seed, zlib.crc32(site.tensor.encode()), draws])
    us = rng.uniform(-0.5, 0.5, (draws, site.channels))
    values = [np.zeros(site.channels)] + [scale * (sh + a * u) for a in amplitudes for sh in shifts for u in us]
    best_err, best = None, np.zeros(site.channels)
    for n in values:
        v = rows + n.astype(np.float32)
        err = ((np.clip(np.round(v / scale) + zp, qmin, qmax) - zp) * scale - v) ** 2
        err = err.sum(axis=0, dtype=np.float64)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err[better], best[better] = err[better], n[better]
    if not best.any():
        return None
    return best.astype(np.float32).reshape(site.noise_shape)


def _grid(model: Model, site: Site) -> tuple[float, float, float, float] | None:
    """(scale, zero point, qmin, qmax) of the site's quantizer, the grid Clip's bounds included."""
    idx = GraphIndex(model.graph)
    q = model.graph.node[site.q]
    zp_t = idx.constant_tensor(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    zp = model.array(zp_t) if zp_t is not None else np.zeros((), np.uint8)
    if zp.size != 1:
        return None
    info = np.iinfo(zp.dtype) if zp.dtype.kind in "iu" else None
    if info is None:
        return None
    scale, z = float(site.step), float(zp.reshape(()))
    qmin, qmax = float(info.min), float(info.max)
    clip = idx.producer_of(q.input[0])
    if clip is not None and clip.op_type == "Clip":
        for k, pick in ((1, max), (2, min)):
            t = idx.constant_tensor(clip.input[k]) if len(clip.input) > k and clip.input[k] else None
            if t is not None:
                bound = float(np.round(float(model.array(t).reshape(())) / scale + z))
                qmin, qmax = (pick(qmin, bound), qmax) if k == 1 else (qmin, pick(qmax, bound))
    return scale, z, qmin, qmax


def noise_pattern(seed: int, tensor: str, channels: int) -> np.ndarray:
    """``u ~ U(-0.5, 0.5)`` per channel, fixed by ``seed`` and the tensor's name (order-independent)."""
    rng = np.random.default_rng([seed, zlib.crc32(tensor.encode())])
    return rng.uniform(-0.5, 0.5, channels)


def noise(site: Site, u: np.ndarray, amplitude: float, shift: float) -> np.ndarray:
    """``N = step * (shift + amplitude * u)`` shaped to broadcast on ``x``'s channel axis."""
    return (float(site.step) * (shift + amplitude * u)).astype(np.float32).reshape(site.noise_shape)


class _Scorer:
    """One onnxruntime session: x, N -> Add -> the quantizer's exact Clip/Q/DQ -> the readers."""

    def __init__(self, model: Model, site: Site, values: list[dict[str, np.ndarray]], grids: list | None = None):
        self.site = site
        self.grids = grids or [None] * len(site.consumers)
        self.outputs = _outputs(model, site)
        self.session = _session(_mini_model(model, site, self.outputs))
        self.xs = [v[site.tensor] for v in values]
        self.refs = [[v[o].astype(np.float64) for o in self.outputs] for v in values]
        self.energy = [max(sum(float((r[k] ** 2).sum()) for r in self.refs), 1e-30) for k in range(len(self.outputs))]

    def __call__(self, n: np.ndarray) -> float:
        n = n.astype(np.float32)
        deltas = [_shaped_delta(c, n, g) for c, g in zip(self.site.consumers, self.grids)]
        err = [0.0] * len(self.outputs)
        for x, refs in zip(self.xs, self.refs):
            got = self.session.run(self.outputs, {self.site.tensor: x, "__noise": n})
            for k, (g, r, d) in enumerate(zip(got, refs, deltas)):
                err[k] += float(((g.astype(np.float64) - d - r) ** 2).sum())
        return sum(e / s for e, s in zip(err, self.energy))


class _BlockScorer:
    """The quantizer's block (``x`` to the next LayerNorm output) as one onnxruntime model with the
    noise and each reader's bias change as inputs; scores a noise by the block output's relative
    squared error against the float model, fed with the block's entering tensors as the current
    quantized model computes them."""

    def __init__(self, site: Site, session: ort.InferenceSession, outputs: list[str],
                 feeds: list[dict[str, np.ndarray]], refs: list[list[np.ndarray]], deltas: list[tuple[str, Linear]]):
        self.site, self.session, self.outputs, self.feeds, self.refs, self.deltas = site, session, outputs, feeds, refs, deltas
        self.n_search = len(feeds)
        self.grids: dict[int, np.ndarray | None] | list | None = None  # per consumer (site.consumers order)
        self.masks: list[np.ndarray | None] = [None] * len(feeds)  # per batch: padded positions weigh 0

    @classmethod
    def build(cls, model: Model, site: Site, ends: set[str], batches: list[dict], block_refs: list[dict],
              n_search: int, token_weights: bool = True) -> _BlockScorer | None:
        idx = GraphIndex(model.graph)
        graph_outputs = {o.name for o in model.graph.output}
        nodes, outputs = _block(idx, site.tensor, ends, graph_outputs)
        outputs = [o for o in outputs if all(o in r for r in block_refs)]
        if not nodes or not outputs:
            return None
        boundary = _boundary(idx, nodes, set())
        if site.tensor not in boundary:
            boundary.append(site.tensor)
        inputs = {i.name for i in model.graph.input}
        run_q = Runner(model, [n for n in boundary if n not in inputs])
        feeds = []
        for b in batches:
            got = run_q(b)
            feeds.append({n: (b[n] if n in inputs else got[n]) for n in boundary})
        refs = [[r[o].astype(np.float64) for o in outputs] for r in block_refs]
        inside = set(nodes)
        deltas = [(f"__delta{k}", c) for k, c in enumerate(site.consumers) if c.node in inside]
        proto = _block_model(model, idx, site, nodes, boundary, outputs, deltas, {**block_refs[0], **feeds[0]})
        scorer = cls(site, _session(proto), outputs, feeds, refs, deltas)
        scorer.n_search, scorer.objective = n_search, "block" if ends else "output"
        scorer.masks = [token_mask(b) if token_weights else None for b in batches]
        return scorer

    @property
    def has_holdout(self) -> bool:
        return len(self.feeds) > self.n_search

    def __call__(self, n: np.ndarray, held: bool = False) -> float:
        """Relative block error on the search samples, or with ``held`` on the held-out ones."""
        n = n.astype(np.float32)
        part = slice(self.n_search, None) if held else slice(0, self.n_search)
        grid = dict(zip((c.node for c in self.site.consumers), self.grids or [None] * len(self.site.consumers)))
        extra = {"__noise": n, **{name: (-_shaped_delta(c, n, grid[c.node])).astype(np.float32) for name, c in self.deltas}}
        total = 0.0
        energy = 0.0
        for f, rs, m in zip(self.feeds[part], self.refs[part], self.masks[part]):
            got = self.session.run(self.outputs, {**f, **extra})
            total += sum(weighted_sq(g.astype(np.float64) - r, m) for g, r in zip(got, rs))
            energy += sum(weighted_sq(r, m) for r in rs)
        return total / max(energy, 1e-30)


def _block_model(model: Model, idx: GraphIndex, site: Site, nodes: list[int], boundary: list[str], outputs: list[str],
                 deltas: list[tuple[str, Linear]], sample: dict[str, np.ndarray]) -> bytes:
    """The block's nodes with ``Add(x, __noise)`` before the quantizer and ``Add(y, __delta<k>)`` after reader k."""
    readers = defaultdict(list)
    for i, slot in site.readers:
        readers[i].append(slot)
    after = {c.node: name for name, c in deltas}
    out_nodes = [helper.make_node("Add", [site.tensor, "__noise"], ["__noisy"])]
    for i in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(idx.nodes[i])
        for slot in readers.get(i, ()):
            copy.input[slot] = "__noisy"
        out_nodes.append(copy)
        if i in after:
            y = copy.output[0]
            copy.output[0] = f"{y}__before_delta"
            out_nodes.append(helper.make_node("Add", [copy.output[0], after[i]], [y]))
    inits, seen = [], set(boundary)
    for n in out_nodes:
        for name in n.input:
            if name and name not in seen:
                seen.add(name)
                t = idx.constant_tensor(name)  # an initializer or a Constant node outside the block
                if t is not None:
                    inits.append(onnx.numpy_helper.from_array(model.array(t), name))
    dtype = helper.np_dtype_to_tensor_dtype
    inputs = [helper.make_tensor_value_info(n, dtype(sample[n].dtype), None) for n in boundary]
    inputs.append(helper.make_tensor_value_info("__noise", TensorProto.FLOAT, list(site.noise_shape)))
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name, _ in deltas]
    graph = helper.make_graph(out_nodes, "noisy_bias_block", inputs,
                              [helper.make_tensor_value_info(o, dtype(sample[o].dtype), None) for o in outputs], inits)
    m = helper.make_model(graph, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    return m.SerializeToString()


def _shaped_delta(c: Linear, n: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """``N W`` per output channel, as the rewritten bias will add it: on ``grid`` (an int32 bias's step) if any."""
    d = c.delta(n.astype(np.float64))
    if grid is not None:
        d = np.round(d / grid) * grid
    return d.reshape((-1,) + (1,) * c.trailing) if c.op == "Conv" else d


def _delta_grids(model: Model, site: Site, int32_bias: bool) -> list[np.ndarray | None]:
    """Per reader, the step its bias change is rounded to by :func:`rewrite` (``beta * s_x * s_w`` for an
    int32 bias, existing or created for ``--target ort``), or None for a float bias: the search scores
    the rounded change, so what it keeps is what the graph computes."""
    idx = GraphIndex(model.graph)
    out = []
    for c in site.consumers:
        b, grid = c.bias, None
        if b.kind == "bias-int32":
            _, s = dequantized(model, idx, idx.nodes[b.dq])
            grid = None if s is None else b.beta * s
        elif b.kind == "no-bias" and int32_bias and site.step is not None and b.w_scale is not None \
                and b.w_scale.size in (1, c.w.shape[0] if c.op == "Conv" else c.w.shape[1]):
            grid = b.beta * (site.step * np.asarray(b.w_scale, np.float64)).astype(np.float32).astype(np.float64)
        out.append(grid)
    return out


def _outputs(model: Model, site: Site) -> list[str]:
    return [model.graph.node[c.node].output[0] for c in site.consumers]


def _mini_model(model: Model, site: Site, outputs: list[str]) -> bytes:
    idx = GraphIndex(model.graph)
    q = idx.nodes[site.q]
    chain = [idx.nodes[i] for i, _ in site.readers if i != site.q] + [q]
    dq = idx.nodes[idx.consumers[q.output[0]][0]]
    consumers = [idx.nodes[c.node] for c in site.consumers]
    helpers = []
    for c in consumers:
        for name in c.input[1:]:
            p = idx.producer_of(name) if name else None
            if p is not None and p.op_type == "DequantizeLinear":
                helpers.append(p)
    nodes = [helper.make_node("Add", [site.tensor, "__noise"], ["__noisy"])]
    for n in [*chain, dq, *helpers, *consumers]:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        nodes.append(copy)
    nodes[1].input[0] = "__noisy"
    inits, seen = [], set()
    for n in nodes[1:]:
        for name in n.input:
            t = idx.constant_storage(name) if name else None
            if t is not None and name not in seen:
                seen.add(name)
                inits.append(onnx.numpy_helper.from_array(model.array(t), name))
    graph = helper.make_graph(
        nodes, "noisy_bias_score",
        [helper.make_tensor_value_info(site.tensor, TensorProto.FLOAT, None),
         helper.make_tensor_value_info("__noise", TensorProto.FLOAT, list(site.noise_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    m = helper.make_model(graph, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    return m.SerializeToString()


def _session(proto: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])


def _batches(data, samples: int) -> list[dict[str, np.ndarray]]:
    if isinstance(data, CalibrationSource):
        return [dict(b) for b in limit(data, samples)]
    out, left = [], samples
    for b in data:  # whole batches (a model with a fixed batch size takes no other)
        out.append(dict(b))
        left -= batch_len(b)
        if left <= 0:
            break
    if not out:
        raise TransformError("noisy-bias: the calibration data is empty")
    return out


def _groups(model: Model, sites: list[Site], batches: list, budget: int) -> Iterable[list[Site]]:
    """Sites in groups whose exposed tensors fit ``budget`` bytes (unknown shapes: 4 MB per sample)."""
    types = infer_types(model)
    n = sum(batch_len(b) for b in batches)
    sizes = {}
    for s in sites:
        total = 0
        for name in [s.tensor, *_outputs(model, s)]:
            info = types.get(name)
            dims = [d for d in (info.shape or ())[1:]] if info is not None and info.shape is not None else None
            known = dims is not None and all(isinstance(d, int) and d > 0 for d in dims)
            total += (int(np.prod(dims)) * 4 if known else 4 << 20) * n
        sizes[s.tensor] = total
    by_name = {s.tensor: s for s in sites}
    for group in plan_groups([s.tensor for s in sites], sizes, budget):
        if group:
            yield [by_name[t] for t in group]


def _done(model: Model) -> list[str]:
    for p in model.proto.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return list(json.loads(p.value))
            except ValueError:
                return []
    return []


def _record(model: Model, qnames: list[str]) -> None:
    names = sorted(set(_done(model)) | set(qnames))
    for p in model.proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(names)
            return
    entry = model.proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(names)


def apply_noises(model: Model, noises: Mapping[str, np.ndarray], *, target: str = "ort") -> dict[str, str]:
    """Add the given noise to each named tensor and fold ``-N W`` into its linear readers.

    Works on float graphs (tensor read by linear layers) and quantized ones (tensor behind a
    Q/DQ read by linear layers); ``N`` is one value per input channel (any shape of that size).
    Returns ``{tensor: placement}``. Raises TransformError naming a tensor that is not a site.
    """
    fold = target == "tensorrt"
    quantized, _ = find_sites(model, quantized=True, fold_into_producer=fold)
    plain, skipped = find_sites(model, quantized=False, fold_into_producer=fold)
    sites = {s.tensor: s for s in plain} | {s.tensor: s for s in quantized}
    chosen = {}
    for name, n in noises.items():
        if name not in sites:
            why = next((s.reason for s in skipped if name in s.reason), "not read by a linear layer")
            raise TransformError(f"noisy-bias: cannot add noise to '{name}': {why}")
        s = sites[name]
        chosen[name] = (s, np.asarray(n, np.float32).reshape(s.noise_shape))
    return rewrite(model, chosen, int32_bias=target == "ort")


__all__ = ["NoisyBias", "NoisyBiasOptions", "NoisyBiasResult", "NoisyLayer", "apply_noises", "noise_pattern"]
