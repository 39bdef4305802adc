"""insert-qdq: QuantizeLinear/DequantizeLinear pairs from a calibration table, per target profile.

Placement (both profiles): Q/DQ on the float *inputs* of quantizable ops, one pair per tensor
shared by every consumer that asked for it. Weighted ops (Conv, ConvTranspose, Gemm, MatMul with
a constant weight) also get their weight stored as int8 + DequantizeLinear, per channel on the
output-channel axis, symmetric (zero point 0) on the narrow grid ``[-(2^(b-1)-1), 2^(b-1)-1]``:
no float copy of a quantized weight remains. With the ``ort`` profile biases become int32 with
``scale = s_x * s_w``. Activation ranges come from the table; a tensor without a range, with a
range beyond ``max_range`` (an attention mask near -3.4e38, say) or excluded by the user stays
float, and ``skipped`` says why. For activation widths below 8 bits a Clip to the grid's ends
precedes the Q (QuantizeLinear saturates to the full storage type, not the narrower grid).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from onnx import NodeProto, TensorProto

from ..calib.qparams import compute_qparams, quantize
from ..calib.table import CalibrationTable
from ..errors import TransformError
from ..graph.build import add_initializer, drop_unread_constants, make_node, rebuild_nodes
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, TensorInfo, attr, infer_types
from ..transforms._base import Skip, Transform, TransformContext, TransformResult, counts_of, register
from .profiles import WEIGHTED_OPS, TargetProfile, get_profile, weight_axis

_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16}


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """Per-tensor recipe entry: force a range, change the bit width, or keep the tensor float."""

    bits: int | None = None
    lo: float | None = None
    hi: float | None = None
    skip: bool = False


@dataclasses.dataclass
class QdqPlan:
    """What insertion would do: activation tensors (with the consumer slots asking), weights, skips."""

    activations: dict[str, list[tuple[int, int]]]
    weights: list[tuple[int, int, int | None]]  # (node, input slot, per-channel axis)
    biases: list[tuple[int, int]]  # (node, input slot)
    skipped: list[Skip]
    concat_groups: list[list[str]]

    def tensors_to_calibrate(self) -> list[str]:
        return list(self.activations)


@register
@dataclasses.dataclass(frozen=True)
class InsertQDQ(Transform):
    """Insert Q/DQ for a target profile from a CalibrationTable."""

    name: ClassVar[str] = "insert-qdq"
    table: CalibrationTable | None = None
    target: str = "ort"
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, TensorOverride] = dataclasses.field(default_factory=dict)
    max_range: float = 1e6
    weighted_only: bool = False
    keep_float_ops: tuple[str, ...] = ()  # op types whose activation inputs stay float (weighted ops unaffected)
    int4: bool = False  # store tensors of <= 4 bits in the opset-21 INT4/UINT4 types (else in int8/uint8)
    weight_method: str = "minmax"  # "minmax" | "mse": how each weight channel's range is chosen

    def __post_init__(self) -> None:
        get_profile(self.target)
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {', '.join(WEIGHT_METHODS)}, got {self.weight_method!r}")
        for bits in (self.weight_bits, self.act_bits):
            if not 2 <= bits <= 8:
                raise ValueError(f"bit widths must be in 2..8, got {bits}")

    @property
    def profile(self) -> TargetProfile:
        return get_profile(self.target)

    def plan(self, model: Model) -> QdqPlan:
        """Decide placement without mutating (also tells calibration which tensors it needs)."""
        return _Planner(self, model).run()

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        if self.table is None:
            raise TransformError("insert-qdq needs a CalibrationTable: calibrate the model first")
        plan = self.plan(model)
        if not plan.activations and not plan.weights:
            return TransformResult(model, False, {}, plan.skipped)
        self.table.check(model)
        if self.int4 and (model.opset("") or 0) < 21:
            raise TransformError(
                f"int4/uint4 storage needs opset 21 (QuantizeLinear/DequantizeLinear with 4-bit types); the model has "
                f"opset {model.opset('')}: convert it first (ogt quantize --int4 does)"
            )
        counts = _Rewriter(self, model, plan).run()
        return TransformResult(model, True, counts_of(self.name, counts), plan.skipped)


class _Planner:
    def __init__(self, t: InsertQDQ, model: Model):
        self.t, self.model = t, model
        self.idx = GraphIndex(model.graph)
        self.types = infer_types(model)
        self.profile = t.profile
        self.acts: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.weights: list[tuple[int, int, int | None]] = []
        self.biases: list[tuple[int, int]] = []
        self.skipped: list[Skip] = []
        self.concats: list[list[str]] = []

    def run(self) -> QdqPlan:
        for i, node in enumerate(self.idx.nodes):
            if node.domain not in ("", "ai.onnx"):
                continue
            pattern = self._excluded(node)
            if pattern and (node.op_type in WEIGHTED_OPS or node.op_type in self.profile.activation_ops):
                self.skipped.append(Skip(node.name, node.op_type, f"excluded by pattern '{pattern}'"))
                continue
            if node.op_type in WEIGHTED_OPS:
                self._weighted(i, node)
            elif (
                node.op_type in self.profile.activation_ops
                and not self.t.weighted_only
                and node.op_type not in self.t.keep_float_ops
            ):
                self._activation_op(i, node)
        acts = {name: slots for name, slots in self.acts.items() if self._eligible(name, slots)}
        groups = [[n for n in g if n in acts] for g in self.concats]
        return QdqPlan(acts, self.weights, self.biases, self.skipped, [g for g in groups if len(g) > 1])

    def _excluded(self, node: NodeProto) -> str | None:
        for pat in self.t.exclude:
            if fnmatch.fnmatchcase(node.name, pat) or fnmatch.fnmatchcase(node.op_type, pat):
                return pat
        return None

    def _weighted(self, i: int, node: NodeProto) -> None:
        idx = self.idx
        if len(node.input) < 2:
            return
        w_name = node.input[1]
        producer = idx.producer_of(w_name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return  # already quantized: a second run changes nothing
        wt = idx.constant_storage(w_name)
        if wt is None:  # a MatMul of two activations (attention scores) stays float without comment
            if node.op_type != "MatMul":
                self.skipped.append(Skip(node.name, node.op_type, f"weight {idx.why_not_constant(w_name)}"))
            return
        if wt.data_type not in _FLOAT:
            return
        axis = weight_axis(node.op_type, int(attr(node, "transB", 0)), len(wt.dims), int(attr(node, "group", 1)))
        others = idx.other_users(w_name, i)
        if others:
            self.skipped.append(Skip(node.name, node.op_type, f"weight '{w_name}' is shared with {', '.join(others)}; left float"))
            return
        self.weights.append((i, 1, axis if self.t.per_channel else None))
        x = node.input[0]
        if not idx.is_constant(x):
            self.acts[x].append((i, 0))
        if self.profile.quantized_bias and node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2:
            b = node.input[2]
            bt = idx.constant_storage(b) if b else None
            if bt is not None and bt.data_type == TensorProto.FLOAT and len(bt.dims) == 1 and not idx.other_users(b, i):
                self.biases.append((i, 2))

    def _activation_op(self, i: int, node: NodeProto) -> None:
        op = node.op_type
        slots = list(range(len(node.input))) if op in ("Add", "Mul", "Concat") else [0]
        inputs = [(k, node.input[k]) for k in slots if k < len(node.input) and node.input[k]]
        activations = [(k, n) for k, n in inputs if not self.idx.is_constant(n)]
        if op in ("Add", "Mul") and self.profile.name == "tensorrt" and len(activations) < 2:
            return  # TensorRT fuses an Add/Mul with a constant into the preceding layer
        for k, name in activations:
            producer = self.idx.producer_of(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                continue
            self.acts[name].append((i, k))
        if op == "Concat" and self.profile.share_concat_scale:
            self.concats.append([n for _, n in activations])

    def _eligible(self, name: str, slots: list[tuple[int, int]]) -> bool:
        info = self.types.get(name, TensorInfo(0, None))
        consumer = self.idx.nodes[slots[0][0]]
        override = self.t.overrides.get(name)
        if override is not None and override.skip:
            self.skipped.append(Skip(consumer.name, consumer.op_type, f"input '{name}' kept float by the recipe"))
            return False
        if info.elem_type not in _FLOAT:
            return False
        table = self.t.table
        if override is not None and override.lo is not None and override.hi is not None:
            return True
        if table is None or name not in table:
            self.skipped.append(Skip(consumer.name, consumer.op_type, f"input '{name}' has no calibration range; left float"))
            return table is None  # planning for calibration: every candidate counts
        lo, hi = table.range(name)
        if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) > self.t.max_range:
            self.skipped.append(
                Skip(consumer.name, consumer.op_type, f"input '{name}' range [{lo:.3g}, {hi:.3g}] exceeds ±{self.t.max_range:g} (a mask?); left float")
            )
            return False
        return True


#: weight range methods: the channel's extremes, or the clipped range with the least squared error
WEIGHT_METHODS = ("minmax", "mse")
#: candidate clipping ratios of the ``mse`` weight method (fractions of the channel's absmax)
MSE_WEIGHT_RATIOS = tuple(float(r) for r in np.linspace(0.5, 1.0, 26))


def quantize_weight(w: np.ndarray, axis: int | None, bits: int, profile: TargetProfile,
                    method: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) of a weight: symmetric, narrow grid, per channel on ``axis``.

    ``method`` "minmax": the grid spans each channel's largest magnitude. "mse": each channel's
    grid spans ``r`` times it, ``r`` from :data:`MSE_WEIGHT_RATIOS` minimising that channel's
    squared rounding + clipping error (ratio 1 is a candidate, so never worse than minmax on the
    weight itself). At 8 bits the two barely differ; at 6 and 4 bits a few large entries per
    channel otherwise set a step most entries round badly on.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"weight method must be one of {', '.join(WEIGHT_METHODS)}, got {method!r}")
    scheme = profile.weight_scheme(bits, axis)
    if axis is None:
        lo, hi = w.min(initial=0.0), w.max(initial=0.0)
    else:
        red = tuple(a for a in range(w.ndim) if a != axis)
        lo, hi = w.min(axis=red, initial=0.0), w.max(axis=red, initial=0.0)
    if method == "mse":
        lo, hi = _mse_range(w, axis, np.asarray(lo, np.float64), np.asarray(hi, np.float64), scheme)
    scale, zp = compute_qparams(lo, hi, scheme)
    return quantize(w, scale, zp, scheme).astype(np.int8), scale


def _mse_range(w: np.ndarray, axis: int | None, lo: np.ndarray, hi: np.ndarray, scheme) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, ``r * (lo, hi)`` for the ratio ``r`` with the least squared quantization error."""
    rows = (w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).astype(np.float64)
    lo_c, hi_c = lo.reshape(-1), hi.reshape(-1)
    best = np.full(len(rows), np.inf)
    ratio = np.ones(len(rows))
    for r in MSE_WEIGHT_RATIOS:
        scale, zp = compute_qparams(lo_c * r, hi_c * r, scheme)
        s, z = scale.astype(np.float64)[:, None], zp.astype(np.float64)[:, None]
        err = ((np.clip(np.round(rows / s) + z, scheme.qmin, scheme.qmax) - z) * s - rows) ** 2
        err = err.sum(axis=1)
        better = err < best
        best[better], ratio[better] = err[better], r
    return (lo_c * ratio).reshape(lo.shape), (hi_c * ratio).reshape(hi.shape)


def _storage(signed: bool, bits: int, int4: bool):
    """The numpy dtype a quantized tensor is stored in: int4/uint4 (ml_dtypes) when asked and it fits."""
    if int4 and bits <= 4:
        import ml_dtypes  # onnx's own dependency for its 4-bit types

        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    return np.int8 if signed else np.uint8


class _Rewriter:
    """Mutation only: every value was decided by the plan and the table."""

    def __init__(self, t: InsertQDQ, model: Model, plan: QdqPlan):
        self.t, self.model, self.plan = t, model, plan
        self.g = model.graph
        self.idx = GraphIndex(self.g)
        self.names = NameAllocator(self.g)
        self.profile = t.profile
        self.before: dict[int, list[NodeProto]] = defaultdict(list)
        self.act_scales: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.replaced: set[str] = set()

    def run(self) -> Counter[str]:
        ranges = self._ranges()
        inputs = {i: self.idx.nodes[i].input[0] for i, _, _ in self.plan.weights}  # before rewiring
        for name, slots in self.plan.activations.items():
            self._activation(name, slots, *ranges[name])
        for i, slot, axis in self.plan.weights:
            w_scale = self._weight(i, slot, axis)
            x = inputs[i]
            for bi, bslot in self.plan.biases:
                if bi == i and x in self.act_scales:
                    self._bias(i, bslot, self.act_scales[x] * w_scale)
        rebuild_nodes(self.g, {i: nodes + [self.idx.nodes[i]] for i, nodes in self.before.items()})
        drop_unread_constants(self.g, self.replaced)  # no float copy of a quantized weight stays
        return self.counts

    def _ranges(self) -> dict[str, tuple[float, float, int]]:
        out = {}
        for name in self.plan.activations:
            o = self.t.overrides.get(name)
            lo, hi = (o.lo, o.hi) if o and o.lo is not None and o.hi is not None else self.t.table.range(name)
            bits = o.bits if o and o.bits else self.t.act_bits
            out[name] = (float(lo), float(hi), bits)
        for group in self.plan.concat_groups:  # TensorRT: one scale for all inputs of a Concat
            lo = min(out[n][0] for n in group)
            hi = max(out[n][1] for n in group)
            for n in group:
                out[n] = (lo, hi, out[n][2])
        return out

    def _activation(self, name: str, slots: list[tuple[int, int]], lo: float, hi: float, bits: int) -> None:
        scheme = self.profile.act_scheme(bits)
        scale, zp = compute_qparams(lo, hi, scheme)
        self.act_scales[name] = float(scale)
        storage = _storage(scheme.signed, bits, self.t.int4)
        s = add_initializer(self.g, self.names, f"{name}_scale", np.asarray(scale, np.float32).reshape(()))
        z = add_initializer(self.g, self.names, f"{name}_zero_point", np.asarray(zp, storage).reshape(()))
        first = min(i for i, _ in slots)
        src = name
        nodes = []
        if bits < (4 if self.t.int4 and bits <= 4 else 8):
            c_lo = add_initializer(self.g, self.names, f"{name}_clip_min", np.float32((scheme.qmin - int(zp)) * float(scale)))
            c_hi = add_initializer(self.g, self.names, f"{name}_clip_max", np.float32((scheme.qmax - int(zp)) * float(scale)))
            src = self.names.new(f"{name}_clipped")
            nodes.append(make_node("Clip", [name, c_lo, c_hi], [src], self.names, f"{name}_clip"))
            self.counts["clip"] += 1
        q = self.names.new(f"{name}_quantized")
        dq = self.names.new(f"{name}_dequantized")
        nodes.append(make_node("QuantizeLinear", [src, s, z], [q], self.names, f"{name}_Q"))
        nodes.append(make_node("DequantizeLinear", [q, s, z], [dq], self.names, f"{name}_DQ"))
        self.before[first].extend(nodes)
        for i, k in slots:
            self.idx.nodes[i].input[k] = dq
        self.counts["activation"] += 1

    def _weight(self, i: int, slot: int, axis: int | None) -> np.ndarray:
        node = self.idx.nodes[i]
        name = node.input[slot]
        w = self.model.array(self.idx.constant_storage(name)).astype(np.float32)
        wq, scale = quantize_weight(w, axis, self.t.weight_bits, self.profile, self.t.weight_method)
        storage = _storage(True, self.t.weight_bits, self.t.int4)
        q = add_initializer(self.g, self.names, f"{name}_quantized", wq.astype(storage))
        s = add_initializer(self.g, self.names, f"{name}_scale", scale.astype(np.float32))
        z = add_initializer(self.g, self.names, f"{name}_zero_point", np.zeros(scale.shape, storage))
        dq = self.names.new(f"{name}_dequantized")
        extra = {"axis": axis} if axis is not None else {}
        self.before[i].append(make_node("DequantizeLinear", [q, s, z], [dq], self.names, f"{name}_DQ", **extra))
        node.input[slot] = dq
        self.replaced.add(name)
        self.counts["weight"] += 1
        return scale.astype(np.float64)

    def _bias(self, i: int, slot: int, scale: np.ndarray) -> None:
        node = self.idx.nodes[i]
        name = node.input[slot]
        b = self.model.array(self.idx.constant_storage(name)).astype(np.float64)
        scale = np.broadcast_to(np.asarray(scale, np.float64), b.shape).astype(np.float32)
        bq = np.clip(np.round(b / np.maximum(scale, 1e-30)), -(2**31), 2**31 - 1).astype(np.int32)
        q = add_initializer(self.g, self.names, f"{name}_quantized", bq)
        s = add_initializer(self.g, self.names, f"{name}_scale", scale)
        z = add_initializer(self.g, self.names, f"{name}_zero_point", np.zeros(scale.shape, np.int32))
        dq = self.names.new(f"{name}_dequantized")
        self.before[i].append(make_node("DequantizeLinear", [q, s, z], [dq], self.names, f"{name}_DQ", axis=0))
        node.input[slot] = dq
        self.replaced.add(name)
        self.counts["bias"] += 1


__all__ = ["InsertQDQ", "QdqPlan", "TensorOverride", "WEIGHT_METHODS", "quantize_weight"]
