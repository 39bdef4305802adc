"""Where noisy-bias can add noise, and the exact rewrite: match (with a reason per refusal), then mutate.

A *site* is one activation tensor ``x`` whose readers are all linear layers (MatMul with a
constant weight, Gemm with ``transA=0``, Conv without padding), either through one
QuantizeLinear -> DequantizeLinear pair (a quantized graph, optionally with the grid Clip that
insert-qdq puts before the Q below 8 bits) or directly (a float graph). The rewrite adds a
per-input-channel constant ``N`` to ``x`` (``Add`` before the Clip/Q, or, for TensorRT, folded
into the bias of the layer that produces ``x``) and adds ``-N W`` to every reader's output
through its bias, with ``W`` the weight exactly as the graph multiplies it (the dequantized
``W_q`` of a quantized weight), so that without activation quantization the graph computes what
it computed before.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict

import numpy as np
from onnx import NodeProto, TensorProto

from ..graph.build import add_initializer, drop_unread_constants, make_node, rebuild_nodes
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex, attr, describe, infer_types
from ..transforms._base import Skip
from .bias_correction import output_shift

LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass
class OutputBias:
    """Something that adds a per-channel vector to a layer's output: where ``+delta`` goes.

    kind: ``bias`` (Conv/Gemm input 2, float), ``bias-int32`` (Conv/Gemm input 2 behind an int32
    DequantizeLinear), ``no-bias`` (Conv/Gemm without one: created), ``add`` (an Add with a
    constant operand: the bias Add after a MatMul, or the producer of ``x``), ``new-add`` (a
    MatMul without bias Add: an Add is created after it, taking over its output name).
    """

    kind: str
    node: int
    slot: int = 2
    trailing: int = 0  # axes after the channel axis in the layer's output
    beta: float = 1.0
    dq: int | None = None  # the bias DequantizeLinear (bias-int32)
    w_scale: np.ndarray | None = None  # per-output-channel weight scale (to create an int32 bias)

    @property
    def key(self) -> tuple[int, int]:
        return (self.node, self.slot)


@dataclasses.dataclass
class Linear:
    """A reader of ``x`` whose ``-N W`` noisy-bias can fold into its output bias."""

    node: int
    op: str
    w: np.ndarray  # as the graph multiplies it; MatMul/Gemm as [K, N], Conv as stored
    group: int
    alpha: float
    bias: OutputBias

    @property
    def channels(self) -> int:
        return int(self.w.shape[1] * self.group) if self.op == "Conv" else int(self.w.shape[0])

    @property
    def trailing(self) -> int:
        return self.w.ndim - 2 if self.op == "Conv" else 0

    def delta(self, noise: np.ndarray) -> np.ndarray:
        """``N W`` per output channel (the change noise ``N`` on the input makes to the output)."""
        n = np.asarray(noise, np.float64).reshape(-1)
        if self.op == "Conv":
            return output_shift("Conv", self.w, n, group=self.group)
        return self.alpha * (n @ self.w)


@dataclasses.dataclass
class Site:
    tensor: str
    readers: list[tuple[int, int]]  # (node, slot) that read x and will read x + N instead
    consumers: list[Linear]
    q: int | None = None  # QuantizeLinear (quantized graphs)
    step: float | None = None
    producer_bias: OutputBias | None = None  # TensorRT: where N can be folded instead of an Add

    @property
    def channels(self) -> int:
        return self.consumers[0].channels

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.channels,) + (1,) * self.consumers[0].trailing


def selected(node: NodeProto, include: tuple[str, ...], exclude: tuple[str, ...]) -> str | None:
    """None when ``node`` is selected, else the reason (glob on node name or op type)."""
    def hit(pats: tuple[str, ...]) -> str | None:
        return next((p for p in pats if fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op_type, p)), None)

    pat = hit(exclude)
    if pat:
        return f"excluded by pattern '{pat}'"
    if not hit(include):
        return f"not matched by --noisy-bias-include {', '.join(include)}"
    return None


def find_sites(model: Model, *, quantized: bool, include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = (),
               fold_into_producer: bool = False) -> tuple[list[Site], list[Skip]]:
    """Sites of a quantized graph (x -> [Clip] -> Q -> DQ -> linear layers) or of a float graph
    (x -> linear layers), and a Skip for each candidate refused."""
    idx = GraphIndex(model.graph)
    types = infer_types(model)
    sites, skips = [], []
    candidates = _quantized_candidates(idx) if quantized else _float_candidates(idx)
    for x, readers, consumers, q, why in candidates:
        where = idx.nodes[consumers[0]] if consumers else idx.nodes[readers[0][0]]
        if why is None:
            why = _check_consumers(idx, model, consumers, include, exclude)
        if why is None and types.get(x) is not None and types[x].elem_type not in (0, TensorProto.FLOAT):
            why = f"'{x}' is not float32"
        if isinstance(why, str):
            skips.append(Skip(where.name, where.op_type, why))
            continue
        linears = why
        step = None
        if q is not None:
            scale = _array(model, idx, idx.nodes[q].input[1])
            if scale is None or scale.size != 1:
                skips.append(Skip(where.name, where.op_type, f"the quantizer of '{x}' is not per-tensor"))
                continue
            step = float(scale.reshape(()))
        site = Site(x, readers, linears, q, step)
        if fold_into_producer:
            site.producer_bias = _producer_bias(idx, model, site)
        sites.append(site)
    return sites, skips


def _quantized_candidates(idx: GraphIndex):
    for i, node in enumerate(idx.nodes):
        if node.op_type != "QuantizeLinear" or idx.is_constant(node.input[0]):
            continue
        x, readers = node.input[0], [(i, 0)]
        clip = idx.producer_of(x)
        if clip is not None and clip.op_type == "Clip" and idx.use_count(x) == 1 and all(idx.is_constant(n) for n in clip.input[1:] if n):
            x, readers = clip.input[0], [(idx.producer[node.input[0]], 0)]
        dqs = [idx.nodes[k] for k in idx.consumers.get(node.output[0], ())]
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or node.output[0] in idx.graph_outputs:
            yield x, readers, [], i, f"the Q of '{x}' is not read by one DequantizeLinear"
            continue
        out = dqs[0].output[0]
        users = list(idx.consumers.get(out, ()))
        if out in idx.graph_outputs or not users:
            yield x, readers, users, i, f"dequantized '{x}' is a graph output"
            continue
        yield x, readers, users, i, None


def _float_candidates(idx: GraphIndex):
    seen = set()
    for node in idx.nodes:
        if node.op_type in LINEAR_OPS and node.input and node.input[0] not in seen:
            x = node.input[0]
            seen.add(x)
            p = idx.producer_of(x)
            if idx.is_constant(x) or (p is not None and p.op_type == "DequantizeLinear"):
                continue
            users = [k for k in idx.consumers.get(x, ()) if idx.nodes[k].op_type in LINEAR_OPS and idx.nodes[k].input[0] == x]
            yield x, [(k, 0) for k in users], users, None, None


def _check_consumers(idx: GraphIndex, model: Model, consumers: list[int], include, exclude) -> list[Linear] | str:
    out = []
    for i in consumers:
        c = idx.nodes[i]
        if c.input[0] not in (idx.nodes[consumers[0]].input[0],) or c.input[0] in c.input[1:]:
            return f"{describe(c)} does not read it as its data input"
        reason = selected(c, include, exclude)
        if reason:
            return reason
        lin = linear(idx, model, i)
        if isinstance(lin, str):
            return f"{describe(c)}: {lin}"
        out.append(lin)
    shapes = {(lin.channels, lin.trailing) for lin in out}
    if len(shapes) != 1:
        return "its linear readers disagree on the channel layout"
    return out


def linear(idx: GraphIndex, model: Model, i: int) -> Linear | str:
    """The Linear view of node ``i`` with its input 0 as x, or why noisy-bias cannot compensate it."""
    node = idx.nodes[i]
    op = node.op_type
    if op not in LINEAR_OPS:
        return f"{op} is not a linear layer noisy-bias can compensate (MatMul, Gemm, Conv)"
    w, w_scale = _weight(model, idx, node.input[1]) if len(node.input) > 1 else (None, None)
    if w is None:
        return "weight is not a constant (or a DequantizeLinear of constants)"
    group, alpha = 1, 1.0
    if op == "MatMul":
        if w.ndim != 2:
            return f"weight of rank {w.ndim} (only 2-D MatMul weights)"
    elif op == "Gemm":
        if int(attr(node, "transA", 0)):
            return "Gemm with transA=1"
        w = w.T if int(attr(node, "transB", 0)) else w
        alpha = float(attr(node, "alpha", 1.0))
    else:
        pads = list(attr(node, "pads", []) or [])
        auto = attr(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if any(pads) or auto not in ("NOTSET", "VALID"):
            return "Conv with padding (the padded border would not see the noise, so -N W would be inexact)"
        group = int(attr(node, "group", 1))
    bias = _output_bias(idx, model, i, w_scale)
    if isinstance(bias, str):
        return bias
    return Linear(i, op, w, group, alpha, bias)


def _output_bias(idx: GraphIndex, model: Model, i: int, w_scale) -> OutputBias | str:
    node = idx.nodes[i]
    if node.op_type == "MatMul":
        y = node.output[0]
        users = idx.consumers.get(y, [])
        if len(users) == 1 and y not in idx.graph_outputs:
            add = idx.nodes[users[0]]
            slot = _const_operand(idx, add, y)
            if slot is not None and add.op_type == "Add":
                c = _array(model, idx, add.input[slot])
                n = idx.nodes[i]
                cols = _weight(model, idx, n.input[1])[0].shape[-1]
                if c is not None and (c.size == 1 or np.broadcast_shapes(c.shape, (cols,)) == c.shape):
                    return OutputBias("add", users[0], slot)
        return OutputBias("new-add", i, -1)
    beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    if beta == 0.0:
        return "Gemm with beta=0 has no bias to carry -N W"
    if len(node.input) < 3 or not node.input[2]:
        return OutputBias("no-bias", i, 2, 0, beta, w_scale=w_scale)
    b = node.input[2]
    if idx.use_count(b) != 1:
        return f"bias '{b}' is shared"
    if idx.constant_storage(b) is not None:
        return OutputBias("bias", i, 2, 0, beta)
    p = idx.producer_of(b)
    if p is not None and p.op_type == "DequantizeLinear" and idx.use_count(p.input[0]) == 1 \
            and all(idx.constant_storage(n) is not None for n in p.input if n):
        return OutputBias("bias-int32", i, 2, 0, beta, dq=idx.producer[b])
    return f"bias '{b}' is not a constant"


def _const_operand(idx: GraphIndex, node: NodeProto, x: str) -> int | None:
    """The slot of ``node``'s one constant operand (read by it alone) when its other operand is ``x``."""
    if len(node.input) != 2 or x not in node.input:
        return None
    slot = 1 - list(node.input).index(x)
    name = node.input[slot]
    if name == x or idx.constant_storage(name) is None or idx.use_count(name) != 1:
        return None
    return slot


def _producer_bias(idx: GraphIndex, model: Model, site: Site) -> OutputBias | None:
    """TensorRT: a bias of the layer producing ``x`` that can absorb N (x read only by the rewired nodes)."""
    x = site.tensor
    if x in idx.graph_outputs or sorted(idx.consumers.get(x, ())) != sorted(i for i, _ in site.readers):
        return None
    p = idx.producer.get(x)
    if p is None:
        return None
    node = idx.nodes[p]
    trailing = site.consumers[0].trailing
    if node.op_type == "Add":
        acts = [n for n in node.input if not idx.is_constant(n)]
        slot = _const_operand(idx, node, acts[0]) if len(acts) == 1 else None
        if slot is None:
            return None
        c = _array(model, idx, node.input[slot])
        shape = site.noise_shape
        if c is None or len(c.shape) < len(shape) or np.broadcast_shapes(c.shape, shape) != c.shape:
            return None
        return OutputBias("add", p, slot, trailing)
    if node.op_type in ("Conv", "Gemm") and node.output[0] == x:
        if (node.op_type == "Conv") != (trailing > 0):  # the producer's output channels must be x's channel axis
            return None
        bias = _output_bias(idx, model, p, None)
        if isinstance(bias, str) or bias.kind not in ("bias", "no-bias"):
            return None
        return bias
    return None


def _array(model: Model, idx: GraphIndex, name: str) -> np.ndarray | None:
    t = idx.constant_storage(name) if name else None
    return None if t is None else model.array(t)


def _weight(model: Model, idx: GraphIndex, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(weight as float64 as the graph multiplies it, its per-channel scale when dequantized)."""
    w = _array(model, idx, name)
    if w is not None:
        return (w.astype(np.float64), None) if w.dtype.kind == "f" else (None, None)
    p = idx.producer_of(name)
    if p is None or p.op_type != "DequantizeLinear":
        return None, None
    return dequantized(model, idx, p)


def dequantized(model: Model, idx: GraphIndex, dq: NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
    q = _array(model, idx, dq.input[0])
    s = _array(model, idx, dq.input[1])
    z = _array(model, idx, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int64)
    if q is None or s is None or z is None:
        return None, None
    s, z = s.astype(np.float64), z.astype(np.float64)
    if s.size > 1:
        axis = int(attr(dq, "axis", 1)) % q.ndim
        shape = [-1 if a == axis else 1 for a in range(q.ndim)]
        s, z = s.reshape(shape), z.reshape(shape)
    return (q.astype(np.float64) - z) * s, s.reshape(-1)


# --------------------------------------------------------------------------- rewrite


def rewrite(model: Model, noises: dict[str, tuple[Site, np.ndarray]], *, int32_bias: bool) -> dict[str, str]:
    """Add each site's noise and fold ``-N W`` into its readers; returns ``{tensor: placement}``.

    ``noises``: tensor -> (site found on this very graph, N of shape ``site.noise_shape``).
    ``int32_bias``: biases created for Conv/Gemm are int32 with ``scale = step * w_scale``
    (the ``ort`` form); otherwise float.
    """
    g = model.graph
    idx = GraphIndex(g)
    names = NameAllocator(g)
    deltas: dict[tuple[int, int], tuple[OutputBias, np.ndarray, float | None]] = {}
    before: dict[int, list[NodeProto]] = defaultdict(list)
    after: dict[int, list[NodeProto]] = defaultdict(list)
    replaced: set[str] = set()
    placements = {}

    def add_delta(target: OutputBias, d: np.ndarray, step: float | None) -> None:
        prev = deltas.get(target.key)
        deltas[target.key] = (target, d if prev is None else prev[1] + d, step if prev is None else prev[2])

    for x, (site, noise) in noises.items():
        noise = np.asarray(noise, np.float32).reshape(site.noise_shape)
        if site.producer_bias is not None:
            add_delta(site.producer_bias, noise.astype(np.float64).reshape(-1), None)
            placements[x] = f"bias of {describe(idx.nodes[site.producer_bias.node])}"
        else:
            c = add_initializer(g, names, f"{x}_noise", noise)
            noisy = names.new(f"{x}_noisy")
            first = min(i for i, _ in site.readers)
            before[first].append(make_node("Add", [x, c], [noisy], names, f"{x}_add_noise"))
            for i, k in site.readers:
                idx.nodes[i].input[k] = noisy
            placements[x] = "add"
        for lin in site.consumers:
            add_delta(lin.bias, -lin.delta(noise.astype(np.float64)), site.step)
    for target, d, step in deltas.values():
        _apply_delta(model, idx, names, target, d, step, int32_bias, before, after, replaced)
    rebuild_nodes(g, {i: [*before.get(i, []), idx.nodes[i], *after.get(i, [])] for i in set(before) | set(after)})
    drop_unread_constants(g, replaced)
    return placements


def _apply_delta(model: Model, idx: GraphIndex, names: NameAllocator, t: OutputBias, d: np.ndarray, step: float | None,
                 int32_bias: bool, before: dict[int, list[NodeProto]], after: dict[int, list[NodeProto]],
                 replaced: set[str]) -> None:
    """Add ``d`` (per output channel) to the output of the layer ``t`` describes."""
    g = model.graph
    node = idx.nodes[t.node]
    d = d / t.beta
    shaped = d.reshape((-1,) + (1,) * t.trailing)
    if t.kind in ("add", "bias"):
        name = node.input[t.slot]
        c = model.array(idx.constant_storage(name)).astype(np.float64)
        node.input[t.slot] = add_initializer(g, names, f"{name}_noisy_bias", (c + shaped).astype(np.float32))
        replaced.add(name)
    elif t.kind == "bias-int32":
        dq = idx.nodes[t.dq]
        b, s = dequantized(model, idx, dq)
        z = _array(model, idx, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else 0
        scale = np.broadcast_to(s, b.shape) if s.size > 1 else s.reshape(())
        q = np.clip(np.round((b + d.reshape(b.shape)) / scale) + z, -(2**31), 2**31 - 1).astype(np.int32)
        replaced.add(dq.input[0])
        dq.input[0] = add_initializer(g, names, f"{dq.input[0]}_noisy", q)
    elif t.kind == "no-bias":
        while len(node.input) < 3:
            node.input.append("")
        if int32_bias and step is not None and t.w_scale is not None and t.w_scale.size in (1, d.size):
            scale = (step * np.broadcast_to(t.w_scale, d.shape)).astype(np.float32)
            q = np.clip(np.round(d / scale), -(2**31), 2**31 - 1).astype(np.int32)
            qn = add_initializer(g, names, f"{node.output[0]}_bias_quantized", q)
            sn = add_initializer(g, names, f"{node.output[0]}_bias_scale", scale)
            zn = add_initializer(g, names, f"{node.output[0]}_bias_zero_point", np.zeros(d.shape, np.int32))
            out = names.new(f"{node.output[0]}_bias_dequantized")
            before[t.node].append(make_node("DequantizeLinear", [qn, sn, zn], [out], names, f"{node.output[0]}_bias_DQ", axis=0))
            node.input[2] = out
        else:
            node.input[2] = add_initializer(g, names, f"{node.output[0]}_bias", d.astype(np.float32))
    elif t.kind == "new-add":
        y = node.output[0]
        raw = names.new(f"{y}_before_bias")
        node.output[0] = raw
        c = add_initializer(g, names, f"{y}_noisy_bias", d.astype(np.float32))
        after[t.node].append(make_node("Add", [raw, c], [y], names, f"{y}_noisy_bias_add"))
    else:  # pragma: no cover - every kind is produced above
        raise AssertionError(t.kind)

