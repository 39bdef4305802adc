"""prune-nm: N:M structured sparsity (default 2:4) along each layer's reduction axis, post-training.

In every group of ``m`` consecutive weights along the axis a layer sums over, keep the ``n``
with the highest score and set the others to 0 (kept weights keep their exact bits):

- Conv ``W[Co, Ci/g, kh, kw]``: groups of input channels, per output channel and kernel
  position (TensorRT's layout for sparse convolution);
- MatMul ``X[..., K] @ W[K, N]``: groups along K (columns of ``W.T``);
- Gemm: along K of ``B`` (``B[K, N]``, or ``B[N, K]`` with ``transB=1``).

Scores: ``magnitude`` ``s = |W|``; ``activation`` (Wanda, Sun et al. 2023)
``s[o, c] = |W[o, c]| * ||X_c||_2``, the L2 norm over calibration data of the layer's input
channel ``c`` (:mod:`ogt.calib.channel_norms`; Conv: channel ``g * Ci/g + c`` for group ``g``).
Ties go to the larger ``|W|``, then to the lower position. A group that already has at most
``n`` non-zeros is left as it is, so a second run changes nothing.

Skipped with a reason: depthwise convolutions, reduction sizes that are not a multiple of
``m``, weights that are not float constants or are shared with another node, batched MatMul
weights, layers matching ``exclude`` (glob on node name or op type), layers with fewer than
``min_channels`` input or output channels, and (activation) layers without statistics.

``target=tensorrt`` keeps dense layouts and rewrites each MatMul whose constant weight is N:M
sparse into ``Gemm(transB=1)`` with ``W.T`` (``[N, K]``, the fully-connected form TensorRT's
sparse tactics look for), with Reshapes around it when X is not 2-D. Prune before insert-qdq:
symmetric int8 weights quantize 0 to 0, so the pattern survives quantization.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
from onnx import NodeProto, TensorProto

from ..calib.channel_norms import ChannelNorms, collect_channel_norms
from ..graph.build import (
    add_initializer,
    drop_unread_constants,
    make_node,
    rebuild_nodes,
    set_constant,
)
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, TensorInfo, attr, infer_types
from . import _nm
from ._base import (
    Skip,
    Transform,
    TransformContext,
    TransformResult,
    counts_of,
    register,
)

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
WEIGHTED = ("Conv", "MatMul", "Gemm")


class Criterion(str, enum.Enum):
    MAGNITUDE = "magnitude"
    ACTIVATION = "activation"


class Target(str, enum.Enum):
    ORT = "ort"
    TENSORRT = "tensorrt"


class Reject(Exception):
    """Why a weighted layer is not pruned (becomes a Skip)."""


@dataclasses.dataclass
class Layer:
    """A weighted node and how its weight maps to rows x reduction."""

    index: int
    node: NodeProto
    weight: str
    tensor: TensorProto
    layout: _nm.Layout
    activation: str  # the input whose channels the weight reduces over
    axis: int  # that input's channel axis

    @property
    def kind(self) -> str:
        return self.node.op_type.lower()


def weighted_nodes(idx: GraphIndex) -> Iterable[tuple[int, NodeProto]]:
    """Conv / Gemm nodes, and MatMuls with a constant operand: the layers prune-nm considers."""
    for i, node in enumerate(idx.nodes):
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        if node.op_type == "MatMul" and not (idx.is_constant(node.input[1]) or idx.is_constant(node.input[0])):
            continue  # activation x activation (attention scores): not a weighted layer
        yield i, node


def layer_of(model: Model, idx: GraphIndex, i: int, m: int) -> Layer:
    """The layer at node ``i``, or Reject with the reason it has no prunable N:M layout."""
    node = idx.nodes[i]
    op, wname = node.op_type, node.input[1]
    if op == "MatMul" and not idx.is_constant(wname):
        raise Reject("the constant is MatMul's left operand (W @ X); only X @ W is pruned")
    t = idx.constant_storage(wname)
    if t is None:
        raise Reject(f"weight {idx.why_not_constant(wname)} (prune before insert-qdq, on the float model)")
    if t.data_type not in FLOAT_TYPES:
        raise Reject(f"weight '{wname}' is not floating point")
    layout, axis = weight_layout(node, tuple(int(d) for d in t.dims), m)
    return Layer(i, node, wname, t, layout, node.input[0], axis)


def weight_layout(node: NodeProto, shape: tuple[int, ...], m: int) -> tuple[_nm.Layout, int]:
    """How ``node``'s weight of ``shape`` maps to rows x reduction, and the channel axis of its input;
    Reject when there is no N:M layout (depthwise, rank, reduction not a multiple of ``m``)."""
    op, wname = node.op_type, node.input[1]
    if op == "Conv":
        group = int(attr(node, "group", 1))
        if len(shape) < 3:
            raise Reject(f"Conv weight '{wname}' has rank {len(shape)}")
        if shape[1] == 1 and group > 1:
            raise Reject(f"depthwise convolution (group={group}, one input channel per group): no reduction axis to prune along")
        layout, axis = _nm.Layout("conv", shape, group), 1
    elif len(shape) != 2:
        raise Reject(f"{op} weight '{wname}' has rank {len(shape)}; only 2-D weights are pruned")
    elif op == "MatMul":
        layout, axis = _nm.Layout("kn", shape), -1
    else:
        layout = _nm.Layout("nk" if int(attr(node, "transB", 0)) else "kn", shape)
        axis = 0 if int(attr(node, "transA", 0)) else 1
    if layout.reduction % m:
        what = "input channels per group" if op == "Conv" else "K"
        raise Reject(f"reduction axis ({what}) has {layout.reduction} values, not a multiple of {m}")
    return layout, axis


def activation_requests(model: Model, m: int = 4) -> list[tuple[str, int]]:
    """``(input tensor, channel axis)`` of every prunable layer: what the activation criterion needs."""
    idx = GraphIndex(model.graph)
    out = []
    for i, _ in weighted_nodes(idx):
        try:
            layer = layer_of(model, idx, i, m)
        except Reject:
            continue
        out.append((layer.activation, layer.axis))
    return list(dict.fromkeys(out))


def collect_norms(model: Model, source: Iterable[Mapping[str, np.ndarray]], m: int = 4) -> ChannelNorms:
    """Input-channel L2 norms of every prunable layer of ``model`` over ``source`` (for ``criterion=activation``)."""
    return collect_channel_norms(model, source, activation_requests(model, m))


@dataclasses.dataclass
class _Plan:
    layer: Layer
    new_weight: np.ndarray | None  # None: weight already N:M (only a TensorRT rewrite)
    zeroed: int = 0


@register
@dataclasses.dataclass(frozen=True)
class PruneNM(Transform):
    """Prune Conv / MatMul / Gemm weights to N:M sparsity (default 2:4) along the reduction axis.

    n, m: keep at most n non-zeros in every m consecutive weights. criterion: magnitude | activation
    (needs ``norms``, see :func:`collect_norms`). exclude: globs on node name or op type.
    min_channels: skip layers with fewer input (reduction) or output channels. target: ort |
    tensorrt (MatMul -> Gemm(transB=1) for TensorRT's sparse tactics).
    """

    name: ClassVar[str] = "prune-nm"
    n: int = 2
    m: int = 4
    criterion: Criterion = Criterion.MAGNITUDE
    norms: ChannelNorms | None = dataclasses.field(default=None, compare=False, repr=False)
    exclude: tuple[str, ...] = ()
    min_channels: int = 0
    target: Target = Target.ORT

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion", Criterion(self.criterion))
        object.__setattr__(self, "target", Target(self.target))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m):
            raise ValueError(f"prune-nm needs integers 1 <= n < m, got n={self.n!r}, m={self.m!r}")
        if self.min_channels < 0:
            raise ValueError(f"min_channels must be >= 0, got {self.min_channels}")
        if self.criterion is Criterion.ACTIVATION and self.norms is None:
            raise ValueError("criterion 'activation' needs activation statistics: "
                             "PruneNM(criterion='activation', norms=collect_norms(model, calibration_source))")

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        idx = GraphIndex(model.graph)
        plans, skipped = self._plan(model, idx)
        counts: Counter[str] = Counter()
        for p in plans:
            if p.new_weight is not None:
                counts[p.layer.kind] += 1
                counts["zeroed"] += p.zeroed
        rewrites = [p.layer for p in plans if self.target is Target.TENSORRT and p.layer.node.op_type == "MatMul"]
        if plans:
            _mutate(model, idx, plans, rewrites)
            counts["to-gemm"] += len(rewrites)
        return TransformResult(model, bool(plans), counts_of(self.name, counts), skipped)

    def _plan(self, model: Model, idx: GraphIndex) -> tuple[list[_Plan], list[Skip]]:
        plans: list[_Plan] = []
        skipped: list[Skip] = []
        for i, node in weighted_nodes(idx):
            try:
                layer = self._check(model, idx, i)
                plan = self._prune(model, layer)
            except Reject as r:
                skipped.append(Skip(node.name, node.op_type, str(r)))
                continue
            if plan.new_weight is None:
                skipped.append(Skip(node.name, node.op_type, f"weight already {self.n}:{self.m} sparse"))
                if not (self.target is Target.TENSORRT and node.op_type == "MatMul"):
                    continue
            plans.append(plan)
        return plans, skipped

    def _check(self, model: Model, idx: GraphIndex, i: int) -> Layer:
        node = idx.nodes[i]
        for pat in self.exclude:
            if fnmatch.fnmatchcase(node.name, pat) or fnmatch.fnmatchcase(node.op_type, pat):
                raise Reject(f"excluded by pattern '{pat}'")
        layer = layer_of(model, idx, i, self.m)
        lay = layer.layout
        if min(lay.reduction, lay.outputs) < self.min_channels:
            raise Reject(f"{lay.reduction} input and {lay.outputs} output channels: fewer than min_channels="
                         f"{self.min_channels}, too small to gain from sparse kernels")
        others = idx.other_users(layer.weight, i)
        if others:
            raise Reject(f"weight '{layer.weight}' is shared with {', '.join(others)}")
        return layer

    def _prune(self, model: Model, layer: Layer) -> _Plan:
        w = model.array(layer.tensor)
        rows = _nm.to_rows(w, layer.layout)
        if _nm.is_nm(rows, self.n, self.m):
            return _Plan(layer, None)
        score = np.abs(rows.astype(np.float64))
        if self.criterion is Criterion.ACTIVATION:
            score = score * _nm.channel_scale_rows(self._norm(layer), layer.layout)
        new_rows, zeroed = _nm.prune_rows(rows, score, self.n, self.m)
        return _Plan(layer, _nm.from_rows(new_rows, layer.layout), zeroed)

    def _norm(self, layer: Layer) -> np.ndarray:
        norm = self.norms.get(layer.activation, layer.axis) if self.norms is not None else None
        if norm is None:
            raise Reject(f"no activation statistics for input '{layer.activation}' (axis {layer.axis}); "
                         "collect them on this graph with collect_norms")
        channels = layer.layout.reduction * (layer.layout.group if layer.layout.kind == "conv" else 1)
        if norm.size != channels:
            raise Reject(f"activation statistics of '{layer.activation}' have {norm.size} channels, the layer reduces over {channels}")
        return norm


def _mutate(model: Model, idx: GraphIndex, plans: list[_Plan], rewrites: list[Layer]) -> None:
    g = model.graph
    names = NameAllocator(g)
    for p in plans:
        if p.new_weight is not None:
            _rewrite_weight(idx, names, p.layer, p.new_weight)
    if not rewrites:
        return
    types = infer_types(model)
    replaced: set[str] = set()
    replacements: dict[int, list[NodeProto]] = {}
    for layer in rewrites:
        replaced.add(layer.node.input[1])
        replacements[layer.index] = _as_gemm(model, names, layer, types.get(layer.node.input[0]))
    rebuild_nodes(g, replacements)
    drop_unread_constants(g, replaced)


def _rewrite_weight(idx: GraphIndex, names: NameAllocator, layer: Layer, value: np.ndarray) -> None:
    """New values get a new name (names are identities); the storage is reused in place."""
    old = layer.weight
    new = names.new(old)
    set_constant(layer.tensor, value)
    producer = idx.producer.get(old)
    if producer is not None and idx.nodes[producer].op_type == "Constant":
        idx.nodes[producer].output[0] = new
    else:
        layer.tensor.name = new
    layer.node.input[1] = new
    layer.weight = new


def _as_gemm(model: Model, names: NameAllocator, layer: Layer, x_info: TensorInfo | None) -> list[NodeProto]:
    """``X @ W`` as ``Gemm(X, W.T, transB=1)``; X reshaped to 2-D and back when it is not 2-D."""
    mm = layer.node
    g = model.graph
    base = mm.name or "matmul"
    w = model.array(layer.tensor)
    k, n = w.shape
    wt = add_initializer(g, names, f"{layer.weight}.T", np.ascontiguousarray(w.T))
    x, y = mm.input[0], mm.output[0]
    if x_info is not None and x_info.rank == 2:
        return [make_node("Gemm", [x, wt], [y], names, f"{base}.gemm", transB=1)]
    flat_shape = add_initializer(g, names, f"{base}.flat_shape", np.array([-1, k], np.int64))
    starts = add_initializer(g, names, f"{base}.lead_start", np.array([0], np.int64))
    ends = add_initializer(g, names, f"{base}.lead_end", np.array([-1], np.int64))
    n_dim = add_initializer(g, names, f"{base}.n", np.array([n], np.int64))
    shape, lead, out_shape, x2, y2 = (names.new(f"{base}.{s}") for s in ("x_shape", "lead", "y_shape", "x2d", "y2d"))
    return [
        make_node("Shape", [x], [shape], names, f"{base}.shape"),
        make_node("Slice", [shape, starts, ends], [lead], names, f"{base}.lead"),
        make_node("Concat", [lead, n_dim], [out_shape], names, f"{base}.y_shape", axis=0),
        make_node("Reshape", [x, flat_shape], [x2], names, f"{base}.flatten"),
        make_node("Gemm", [x2, wt], [y2], names, f"{base}.gemm", transB=1),
        make_node("Reshape", [y2, out_shape], [y], names, f"{base}.unflatten"),
    ]
