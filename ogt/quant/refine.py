"""Layer-wise range refinement: pick each activation quantizer's range by its consumers' error.

A calibration method chooses a tensor's clipping range from that tensor's own distribution
(minmax, percentile, KL, MSE). What matters is the error of the layers that read it. For every
activation quantizer whose consumers are all weighted layers with quantized weights (Conv,
ConvTranspose, Gemm, MatMul), ``refine_table`` searches the range that minimises

    sum over consumers c of  ||c(DQ(Q(x; range)), W_q) - c(x, W)||^2 / ||c(x, W)||^2

on ``samples`` calibration samples: the consumer is run in onnxruntime with its quantized
weight (and int32 bias) exactly as insert-qdq writes them, ``x`` and the float reference
``c(x, W)`` come from the float model. Candidates are ``alpha * [min(m, 0), max(M, 0)]`` for the
observed ``[m, M]`` and ``alpha`` on a log grid, then bisected (in log space) around the best
grid point, plus the range the calibration method chose, so refinement never scores worse than
the method on the samples it looks at. No gradients, no training: a few dozen small onnxruntime
runs per quantizer, one session each, and memory bounded by ``budget_bytes`` of exposed
activations at a time whatever the calibration set size.

Quantizers read by anything else (an Add, a Concat, a pooling op) keep the method's range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..calib.collect import plan_groups
from ..calib.data import CalibrationSource, _rebatch, limit
from ..calib.qparams import QScheme, compute_qparams
from ..calib.table import CalibrationTable, TensorRange
from ..graph.model import Model
from ..graph.patterns import layernorms
from ..graph.query import GraphIndex, TensorInfo, infer_types
from ..testing.equivalence import Runner
from ..transforms import TransformContext
from .insert_qdq import InsertQDQ
from .profiles import WEIGHTED_OPS
from .tokens import token_mask, weighted_sq


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    samples: int = 8
    grid: int = 10
    bisections: int = 4
    min_alpha: float = 0.02
    side_factors: tuple[float, ...] = (0.6, 0.8, 1.25, 1.6)
    block_span: float = 2.0  # block objective: multipliers of the current range in [1/span, span]
    block_grid: int = 7
    block_bisections: int = 2
    block_side_factors: tuple[float, ...] = (0.8, 1.25)
    budget_bytes: int = 256 << 20
    token_weights: bool = True  # block objective: padded positions (attention mask 0) count nothing


@dataclasses.dataclass(frozen=True)
class Refined:
    """What refinement chose for one tensor (errors are the consumers' relative squared error)."""

    tensor: str
    alpha: float
    lo: float
    hi: float
    error_before: float
    error_after: float


@dataclasses.dataclass
class _Job:
    tensor: str
    bits: int
    consumers: list[onnx.NodeProto]
    helpers: list[onnx.NodeProto]  # DequantizeLinear nodes of the consumers' weights and biases
    constants: list[tuple[str, TensorProto]]


def refine_table(
    reference: Model,
    table: CalibrationTable,
    source: CalibrationSource,
    insert: InsertQDQ,
    options: RefineOptions = RefineOptions(),
) -> tuple[CalibrationTable, list[Refined]]:
    """A copy of ``table`` with the ranges of weighted-layer inputs refined; see the module docstring.

    ``insert`` is the insert-qdq transform the caller will apply (its table is ignored: ``table``
    is used); ``reference`` is the float model it will be applied to, left unchanged.
    """
    qmodel = reference.copy()
    dataclasses.replace(insert, table=table)(qmodel, TransformContext(validate=False))
    types = infer_types(reference)
    jobs = _jobs(qmodel, table, insert)
    if not jobs:
        return table, []
    batches = list(limit(source, options.samples))
    sizes = {j.tensor: _job_bytes(j, types, batches, options.samples) for j in jobs}
    by_name = {j.tensor: j for j in jobs}
    ranges = dict(table.ranges)
    chosen: list[Refined] = []
    for group in plan_groups([j.tensor for j in jobs], sizes, options.budget_bytes):
        wanted = [*group, *(o for t in group for c in by_name[t].consumers for o in c.output)]
        run_ref = Runner(reference, list(dict.fromkeys(wanted)))
        outs = [run_ref(b) for b in batches]
        values = {n: np.concatenate([o[n] for o in outs]) for n in wanted if all(n in o for o in outs)}
        del outs
        for name in group:
            job = by_name[name]
            if name not in values or any(o not in values for c in job.consumers for o in c.output):
                continue
            scheme = insert.profile.act_scheme(job.bits)
            result = _search(job, qmodel, types, values, ranges[name], scheme, options)
            if result is not None:
                r = ranges[name]
                ranges[name] = TensorRange(name, result.lo, result.hi, r.min, r.max, r.samples)
                chosen.append(result)
        del values
    out = CalibrationTable(
        table.fingerprint,
        f"{table.method}+refine",
        table.samples,
        ranges,
        {**table.options, "refine": dataclasses.asdict(options) | {"refined": len(chosen)}},
    )
    return out, chosen


def _jobs(qmodel: Model, table: CalibrationTable, insert: InsertQDQ) -> list[_Job]:
    """Quantizers (in graph order) whose dequantized output only feeds weighted ops' data input."""
    idx = GraphIndex(qmodel.graph)
    jobs = []
    for node in idx.nodes:
        if node.op_type != "QuantizeLinear" or idx.is_constant(node.input[0]):
            continue
        tensor = _calibrated_tensor(idx, node, table)
        dq = _users(idx, node.output[0])
        if tensor is None or len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
            continue
        consumers = _users(idx, dq[0].output[0])
        if not consumers or any(c.op_type not in WEIGHTED_OPS or c.input[0] != dq[0].output[0] for c in consumers):
            continue
        helpers, constants, ok = [], [], True
        for c in consumers:
            for name in c.input[1:]:
                if not name:
                    continue
                p = idx.producer_of(name)
                if p is not None and p.op_type == "DequantizeLinear" and all(idx.is_constant(i) for i in p.input if i):
                    helpers.append(p)
                    constants.extend((i, idx.constant_storage(i)) for i in p.input if i)
                elif idx.constant_storage(name) is not None:
                    constants.append((name, idx.constant_storage(name)))
                else:
                    ok = False
        if ok and all(t is not None for _, t in constants):
            override = insert.overrides.get(tensor)
            bits = override.bits if override and override.bits else insert.act_bits
            if override is None or override.lo is None:
                jobs.append(_Job(tensor, bits, consumers, helpers, constants))
    return jobs


def _users(idx: GraphIndex, name: str) -> list[onnx.NodeProto]:
    return [idx.nodes[i] for i in idx.consumers.get(name, ())]


def _calibrated_tensor(idx: GraphIndex, q: onnx.NodeProto, table: CalibrationTable) -> str | None:
    """The table's tensor a Q reads: its input, or the input of the grid Clip insert-qdq put before it."""
    x = q.input[0]
    if x in table:
        return x
    p = idx.producer_of(x)
    if p is not None and p.op_type == "Clip" and p.input[0] in table and len(_users(idx, x)) == 1:
        return p.input[0]
    return None


def _job_bytes(job: _Job, types: Mapping[str, TensorInfo], batches: Sequence, samples: int) -> int:
    """Rough exposed bytes for ``samples`` samples (unknown shapes count as 4 MB per sample)."""
    total = 0
    n = sum(len(next(iter(b.values()))) for b in batches) or samples
    for name in [job.tensor, *(o for c in job.consumers for o in c.output)]:
        info = types.get(name)
        dims = info.shape if info is not None and info.shape is not None else None
        per = int(np.prod([d for d in dims[1:] if isinstance(d, int) and d > 0])) * 4 if dims else 4 << 20
        total += per * n
    return total


def _fake_quant_model(job: _Job, qmodel: Model, types: Mapping[str, TensorInfo], scheme: QScheme) -> bytes:
    """x, scale, zero point (float) -> fake-quantized x -> the consumers with their quantized weights."""
    info = types.get(job.tensor)
    elem = info.elem_type if info is not None and info.elem_type else TensorProto.FLOAT
    fq = f"{job.tensor}__refine_fq"
    nodes = [
        helper.make_node("Div", [job.tensor, "__scale"], ["__t"]),
        helper.make_node("Round", ["__t"], ["__r"]),
        helper.make_node("Add", ["__r", "__zp"], ["__rz"]),
        helper.make_node("Clip", ["__rz", "__qmin", "__qmax"], ["__c"]),
        helper.make_node("Sub", ["__c", "__zp"], ["__cz"]),
        helper.make_node("Mul", ["__cz", "__scale"], [fq]),
    ]
    for node in [*job.helpers, *job.consumers]:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if node in job.consumers:
            copy.input[0] = fq
        nodes.append(copy)
    inits = [helper.make_tensor("__qmin", TensorProto.FLOAT, [], [scheme.qmin]),
             helper.make_tensor("__qmax", TensorProto.FLOAT, [], [scheme.qmax])]
    seen = set()
    for name, t in job.constants:
        if name not in seen:
            seen.add(name)
            inits.append(onnx.numpy_helper.from_array(qmodel.array(t), name))
    outputs = [o for c in job.consumers for o in c.output]
    graph = helper.make_graph(
        nodes,
        "refine",
        [helper.make_tensor_value_info(job.tensor, elem, None),
         helper.make_tensor_value_info("__scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("__zp", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info(o, (types.get(o) or TensorInfo(elem, None)).elem_type or elem, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=list(qmodel.proto.opset_import), ir_version=qmodel.proto.ir_version)
    return model.SerializeToString()


def _search(job: _Job, qmodel: Model, types, values, current: TensorRange, scheme: QScheme,
            options: RefineOptions) -> Refined | None:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_fake_quant_model(job, qmodel, types, scheme), opts, providers=["CPUExecutionProvider"])
    x = values[job.tensor]
    outputs = [o for c in job.consumers for o in c.output]
    refs = [values[o].astype(np.float64) for o in outputs]
    energy = [max(float((r**2).sum()), 1e-30) for r in refs]
    base_lo, base_hi = min(current.min, 0.0), max(current.max, 0.0)
    if not (np.isfinite(base_lo) and np.isfinite(base_hi)) or base_hi - base_lo <= 0:
        return None

    def error(lo: float, hi: float) -> float:
        scale, zp = compute_qparams(lo, hi, scheme)
        got = session.run(outputs, {job.tensor: x, "__scale": np.asarray(scale, np.float32).reshape(()), "__zp": np.asarray(zp, np.float32).reshape(())})
        return sum(float(((g.astype(np.float64) - r) ** 2).sum()) / e for g, r, e in zip(got, refs, energy))

    return _best_range(job.tensor, error, base_lo, base_hi, current, np.geomspace(options.min_alpha, 1.0, options.grid), options)


def _best_range(tensor: str, error, base_lo: float, base_hi: float, current: TensorRange, grid: np.ndarray,
                options: RefineOptions) -> Refined:
    """Search ``alpha * [base_lo, base_hi]`` over ``grid`` then by bisection (log space), then each end
    of a two-sided range on its own; keep the current range unless a candidate beats it."""
    tried: dict[float, float] = {}

    def at(alpha: float) -> float:
        if alpha not in tried:
            tried[alpha] = error(alpha * base_lo, alpha * base_hi)
        return tried[alpha]

    for a in grid:
        at(float(a))
    best = min(tried, key=tried.get)
    k = int(np.argmin(np.abs(np.log(grid) - np.log(best))))
    lo_a, hi_a = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    for _ in range(options.bisections):  # shrink the bracket around the best point, in log space
        left, right = float(np.sqrt(lo_a * best)), float(np.sqrt(best * hi_a))
        winner = min((left, best, right), key=at)
        if winner == left:
            lo_a, hi_a, best = lo_a, best, left
        elif winner == right:
            lo_a, hi_a, best = best, hi_a, right
        else:
            lo_a, hi_a = left, right
    alpha = min(tried, key=tried.get)
    lo, hi, err = alpha * base_lo, alpha * base_hi, tried[alpha]
    if base_lo < 0 < base_hi:  # a two-sided range: move each end on its own, around the common alpha
        for side in (1, 0):
            for f in options.side_factors:
                cand = [lo, hi]
                cand[side] = max(min(cand[side] * f, max(base_hi, current.max)), min(base_lo, current.min))
                e = error(*cand)
                if e < err:
                    lo, hi, err = cand[0], cand[1], e
    before = error(current.lo, current.hi)
    if err >= before:
        return Refined(tensor, float("nan"), current.lo, current.hi, before, before)
    return Refined(tensor, alpha, lo, hi, before, err)


# -- block objective (token-clip's fine stage) ----------------------------------------------------


@dataclasses.dataclass
class _Quantizer:
    tensor: str
    nodes: list[onnx.NodeProto]  # [Clip?], Q, DQ
    params: list[str]  # scale, zero point, [clip low, clip high]: overridable in the working model
    bits: int


def refine_blocks(
    reference: Model,
    table: CalibrationTable,
    source: CalibrationSource,
    insert: InsertQDQ,
    options: RefineOptions = RefineOptions(),
) -> tuple[CalibrationTable, list[Refined]]:
    """Refine every activation quantizer, in graph order, on the error of its *block*'s output.

    The block of a quantized tensor ends at the first LayerNorm output downstream of it (a
    transformer sublayer: attention or feed-forward, residual and LayerNorm included), or at the
    graph outputs it reaches when no LayerNorm follows. Each candidate range is scored by running
    that block alone in onnxruntime, fed with the tensors entering it as the partially refined
    quantized model computes them (earlier quantizers already moved: layer by layer, in order),
    against the float model's block output. Candidates: multipliers of the current range between
    ``1 / block_span`` and ``block_span`` (log grid, then bisection, then each end on its own).
    Models without LayerNorm fall back to :func:`refine_table` (the layer objective).
    """
    ref_idx = GraphIndex(reference.graph)
    ln_outputs = {m.output for m in layernorms(ref_idx)}
    if not ln_outputs:
        return refine_table(reference, table, source, insert, options)
    work = TunableQDQ(reference, table, insert)
    qmodel, qidx, quantizers, params = work.model, work.idx, work.quantizers, work.params
    if not quantizers:
        return table, []
    graph_outputs = {o.name for o in qmodel.graph.output}
    blocks = {q.tensor: _block(qidx, q.tensor, ln_outputs, graph_outputs) for q in quantizers}
    boundary = {q.tensor: _boundary(qidx, blocks[q.tensor][0], set(q.params)) for q in quantizers}
    batches = list(_rebatch(limit(source, options.samples), options.samples))  # one run per candidate
    run_ref = Runner(reference, sorted({o for _, outs in blocks.values() for o in outs}))
    ref_out = [run_ref(b) for b in batches]
    masks = [token_mask(b) if options.token_weights else None for b in batches]  # padded positions count 0
    run_q = Runner(qmodel, sorted({n for names in boundary.values() for n in names}))
    ranges = dict(table.ranges)
    chosen: list[Refined] = []
    grid = np.geomspace(1.0 / options.block_span, options.block_span, options.block_grid)
    options = dataclasses.replace(options, bisections=options.block_bisections, side_factors=options.block_side_factors)
    feeds, state_of = [], None
    for q in quantizers:
        nodes, outputs = blocks[q.tensor]
        if not outputs:
            continue
        if state_of != tuple(outputs):  # refresh the tensors entering each block once per block
            feeds, state_of = [run_q({**b, **params}) for b in batches], tuple(outputs)
        session = _block_session(qmodel, qidx, nodes, boundary[q.tensor], q.params, outputs, {**feeds[0], **ref_out[0]}, params)
        scheme = insert.profile.act_scheme(q.bits)
        refs = [[r[o].astype(np.float64) for o in outputs] for r in ref_out]
        energy = max(sum(weighted_sq(a, m) for rs, m in zip(refs, masks) for a in rs), 1e-30)

        def error(lo: float, hi: float, q=q, session=session, feeds=feeds, refs=refs, scheme=scheme) -> float:
            mine = _param_values(q, params, lo, hi, scheme)
            total = 0.0
            for f, rs, m in zip(feeds, refs, masks):
                got = session.run(outputs, {**{n: f[n] for n in boundary[q.tensor]}, **mine})
                total += sum(weighted_sq(g.astype(np.float64) - r, m) for g, r in zip(got, rs))
            return total / energy

        r = ranges[q.tensor]
        if not (np.isfinite(r.lo) and np.isfinite(r.hi)) or r.hi - r.lo <= 0:
            continue
        result = _best_range(q.tensor, error, r.lo, r.hi, r, grid, options)
        if result.error_after < result.error_before:
            ranges[q.tensor] = TensorRange(q.tensor, result.lo, result.hi, r.min, r.max, r.samples)
            params.update(_param_values(q, params, result.lo, result.hi, scheme))
        chosen.append(result)
    out = CalibrationTable(table.fingerprint, f"{table.method}+refine-blocks", table.samples, ranges,
                           {**table.options, "refine": dataclasses.asdict(options) | {"objective": "block"}})
    return out, chosen


def reference_outputs(run_ref: Runner, reference: Model, batches: Sequence) -> list[dict[str, np.ndarray]]:
    """The float model's graph outputs on each batch (``run_ref`` may expose more: those are dropped)."""
    outputs = {o.name for o in reference.graph.output}
    return [{k: v for k, v in run_ref(b).items() if k in outputs} for b in batches]


def output_error(run, batches: Sequence, expected: Sequence[Mapping[str, np.ndarray]],
                 token_weights: bool = True) -> tuple[float, float, float]:
    """(signal energy, squared error, element count) of ``run``'s float outputs against ``expected``;
    with ``token_weights``, padded positions of ``[batch, sequence, ...]`` outputs count nothing."""
    signal, noise, count = 0.0, 0.0, 0.0
    for batch, ref in zip(batches, expected):
        got = run(batch)
        mask = token_mask(batch) if token_weights else None
        for name, a in ref.items():
            if a.dtype.kind == "f":
                a = a.astype(np.float64)
                signal += weighted_sq(a, mask)
                noise += weighted_sq(a - got[name], mask)
                count += weighted_sq(np.ones(a.shape), mask)
    return signal, noise, count


class TunableQDQ:
    """``reference`` with ``insert``'s Q/DQ, every activation quantizer's scale, zero point (and grid
    Clip bounds) turned into overridable graph inputs: one onnxruntime session evaluates any set
    of ranges (``values(ranges)`` gives the feeds). For scoring only; never saved."""

    def __init__(self, reference: Model, table: CalibrationTable, insert: InsertQDQ):
        self.model = reference.copy()
        self.insert = dataclasses.replace(insert, table=table)
        self.insert(self.model, TransformContext(validate=False))
        self.idx = GraphIndex(self.model.graph)
        self.quantizers = _quantizers(self.idx, table, insert)
        self.params: dict[str, np.ndarray] = {}
        for q in self.quantizers:
            for name in q.params:
                t = self.idx.initializers[name]
                self.params[name] = self.model.array(t)
                self.model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))

    def values(self, ranges: Mapping[str, TensorRange]) -> dict[str, np.ndarray]:
        out = dict(self.params)
        for q in self.quantizers:
            if q.tensor in ranges:
                r = ranges[q.tensor]
                out.update(_param_values(q, self.params, r.lo, r.hi, self.insert.profile.act_scheme(q.bits)))
        return out


def _quantizers(idx: GraphIndex, table: CalibrationTable, insert: InsertQDQ) -> list[_Quantizer]:
    out = []
    for node in idx.nodes:
        if node.op_type != "QuantizeLinear" or idx.is_constant(node.input[0]):
            continue
        tensor = _calibrated_tensor(idx, node, table)
        dq = _users(idx, node.output[0])
        override = insert.overrides.get(tensor) if tensor else None
        if tensor is None or len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or (override and override.lo is not None):
            continue
        if dq[0].input[1] != node.input[1] or len(node.input) < 3 or dq[0].input[2] != node.input[2]:
            continue
        nodes, names = [node, dq[0]], [node.input[1], node.input[2]]
        clip = idx.producer_of(node.input[0])
        if node.input[0] != tensor and clip is not None and clip.op_type == "Clip":
            nodes.insert(0, clip)
            names += [clip.input[1], clip.input[2]]
        if all(n in idx.initializers for n in names):
            bits = override.bits if override and override.bits else insert.act_bits
            out.append(_Quantizer(tensor, nodes, names, bits))
    return out


def _block(idx: GraphIndex, tensor: str, ends: set[str], graph_outputs: set[str]) -> tuple[list[int], list[str]]:
    """Node indices on paths from ``tensor`` to its block output(s), and those outputs."""
    forward, stack, outputs = set(), [tensor], []
    while stack:
        name = stack.pop()
        for i in idx.consumers.get(name, []):
            if i in forward:
                continue
            forward.add(i)
            for o in idx.nodes[i].output:
                if o in ends:
                    outputs.append(o)
                else:
                    if o in graph_outputs:
                        outputs.append(o)
                    stack.append(o)
    outputs = list(dict.fromkeys(o for o in outputs if o in ends)) or list(dict.fromkeys(outputs))
    backward, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        i = idx.producer.get(name)
        if i is None or i in backward or i not in forward:
            continue
        backward.add(i)
        stack.extend(n for n in idx.nodes[i].input if n)
    return sorted(forward & backward), outputs


def _boundary(idx: GraphIndex, nodes: list[int], own: set[str]) -> list[str]:
    """Tensors the block reads that it does not compute (constants and this quantizer's parameters excluded)."""
    inside = {o for i in nodes for o in idx.nodes[i].output}
    reads = {n for i in nodes for n in idx.nodes[i].input if n}
    return sorted(n for n in reads - inside - own if not idx.is_constant(n) or n in idx.graph_inputs)


def _block_session(qmodel: Model, idx: GraphIndex, nodes: list[int], boundary: list[str], own: list[str],
                   outputs: list[str], sample: dict, params: dict) -> ort.InferenceSession:
    """The block as a standalone model: boundary tensors and this quantizer's parameters in, block outputs out."""
    reads = {n for i in nodes for n in idx.nodes[i].input if n}
    inits = []
    for name in sorted(reads - set(boundary) - set(own)):
        if name in params:
            inits.append(onnx.numpy_helper.from_array(np.asarray(params[name]), name))
        else:
            t = idx.constant_tensor(name)  # an initializer or a Constant node outside the block
            if t is not None:
                inits.append(onnx.numpy_helper.from_array(qmodel.array(t), name))
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(sample[n].dtype), None) for n in boundary]
    inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(params[n]).dtype), None) for n in own]
    graph = helper.make_graph(
        [idx.nodes[i] for i in nodes], "block", inputs,
        [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(sample[o].dtype), None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=list(qmodel.proto.opset_import), ir_version=qmodel.proto.ir_version)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _param_values(q: _Quantizer, params: dict, lo: float, hi: float, scheme: QScheme) -> dict[str, np.ndarray]:
    """The quantizer's scale, zero point (and grid Clip bounds) for the range [lo, hi], in their stored dtypes."""
    scale, zp = compute_qparams(lo, hi, scheme)
    values = {
        q.params[0]: np.asarray(scale, np.float32).reshape(np.shape(params[q.params[0]])),
        q.params[1]: np.asarray(zp).astype(np.asarray(params[q.params[1]]).dtype).reshape(np.shape(params[q.params[1]])),
    }
    if len(q.params) == 4:
        values[q.params[2]] = np.asarray((scheme.qmin - int(zp)) * float(scale), np.float32).reshape(np.shape(params[q.params[2]]))
        values[q.params[3]] = np.asarray((scheme.qmax - int(zp)) * float(scale), np.float32).reshape(np.shape(params[q.params[3]]))
    return values


__all__ = ["RefineOptions", "Refined", "TunableQDQ", "output_error", "reference_outputs", "refine_blocks", "refine_table"]
