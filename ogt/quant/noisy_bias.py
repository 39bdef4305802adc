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
from collections import Counter
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
from ..graph.query import GraphIndex, infer_types
from ..testing.equivalence import Runner
from ..transforms._base import Skip, Transform, TransformContext, TransformResult, counts_of, register
from ._noise_sites import Linear, Site, find_sites, rewrite

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

    @property
    def gain_db(self) -> float:
        if self.error_after <= 0 or self.error_before <= 0:
            return 0.0
        return float(10 * np.log10(self.error_before / self.error_after))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "gain_db": round(self.gain_db, 4)}


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
    samples: int = 8
    include: tuple[str, ...] = ("*",)  # globs on the linear layers' node names or op types
    exclude: tuple[str, ...] = ()
    min_gain: float = 0.02  # relative error reduction a layer needs to keep its noise

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
    samples: int = 8
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    min_gain: float = 0.02
    budget_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.target not in ("ort", "tensorrt"):
            raise ValueError(f"target must be ort or tensorrt, got {self.target!r}")
        if not self.amplitudes or any(a < 0 for a in self.amplitudes):
            raise ValueError(f"amplitudes must be non-empty and >= 0, got {self.amplitudes}")
        if not self.shifts:
            raise ValueError("shifts must not be empty (use (0.0,) for no shift)")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")

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
        batches = _batches(self.data, self.samples)
        rows, kept, current = [], [], {model.graph.node[s.q].name: s for s in searchable}
        groups = [[(model.graph.node[s.q].name, _outputs(model, s)) for s in g]
                  for g in _groups(model, searchable, batches, self.budget_bytes)]  # names: indices move on rewrite
        for group in groups:
            run_ref = Runner(self.reference, list(dict.fromkeys(n for _, outs in group for n in outs)))
            refs = [run_ref(b) for b in batches]
            for qname, _ in group:
                site = current[qname]
                # x as the quantizer sees it: after the upstream quantization error and upstream noise
                run_q = Runner(model, [site.tensor])
                values = [{**r, site.tensor: run_q(b)[site.tensor]} for r, b in zip(refs, batches)]
                row, noise = self._search(model, site, values)
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

    def _search(self, model: Model, site: Site, values: list[dict[str, np.ndarray]]) -> tuple[NoisyLayer, np.ndarray | None]:
        layer_names = tuple(model.graph.node[c.node].name for c in site.consumers)
        score = _Scorer(model, site, values)
        u = noise_pattern(self.seed, site.tensor, site.channels)
        zero = np.zeros(site.noise_shape, np.float32)
        before = score(zero)
        best, best_err = (0.0, 0.0), before
        for a in self.amplitudes:
            for sh in self.shifts:
                if a == 0 and sh == 0:
                    continue
                err = score(noise(site, u, a, sh))
                if err < best_err:
                    best, best_err = (a, sh), err
        step = float(site.step)
        if best == (0.0, 0.0) or not best_err < before * (1 - self.min_gain):
            note = "noise did not lower the error" if best == (0.0, 0.0) else \
                f"best candidate lowered the error by {100 * (1 - best_err / before):.2f}% < min_gain {100 * self.min_gain:g}%"
            return NoisyLayer(site.tensor, layer_names, False, 0.0, 0.0, step, before, before, "none", note), None
        a, sh = best
        return NoisyLayer(site.tensor, layer_names, True, a, sh, step, before, best_err, ""), noise(site, u, a, sh)


def noise_pattern(seed: int, tensor: str, channels: int) -> np.ndarray:
    """``u ~ U(-0.5, 0.5)`` per channel, fixed by ``seed`` and the tensor's name (order-independent)."""
    rng = np.random.default_rng([seed, zlib.crc32(tensor.encode())])
    return rng.uniform(-0.5, 0.5, channels)


def noise(site: Site, u: np.ndarray, amplitude: float, shift: float) -> np.ndarray:
    """``N = step * (shift + amplitude * u)`` shaped to broadcast on ``x``'s channel axis."""
    return (float(site.step) * (shift + amplitude * u)).astype(np.float32).reshape(site.noise_shape)


class _Scorer:
    """One onnxruntime session: x, N -> Add -> the quantizer's exact Clip/Q/DQ -> the readers."""

    def __init__(self, model: Model, site: Site, values: list[dict[str, np.ndarray]]):
        self.site = site
        self.outputs = _outputs(model, site)
        self.session = _session(_mini_model(model, site, self.outputs))
        self.xs = [v[site.tensor] for v in values]
        self.refs = [[v[o].astype(np.float64) for o in self.outputs] for v in values]
        self.energy = [max(sum(float((r[k] ** 2).sum()) for r in self.refs), 1e-30) for k in range(len(self.outputs))]

    def __call__(self, n: np.ndarray) -> float:
        n = n.astype(np.float32)
        deltas = [_shaped_delta(c, n) for c in self.site.consumers]
        err = [0.0] * len(self.outputs)
        for x, refs in zip(self.xs, self.refs):
            got = self.session.run(self.outputs, {self.site.tensor: x, "__noise": n})
            for k, (g, r, d) in enumerate(zip(got, refs, deltas)):
                err[k] += float(((g.astype(np.float64) - d - r) ** 2).sum())
        return sum(e / s for e, s in zip(err, self.energy))


def _shaped_delta(c: Linear, n: np.ndarray) -> np.ndarray:
    d = c.delta(n.astype(np.float64))
    return d.reshape((-1,) + (1,) * c.trailing) if c.op == "Conv" else d


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
