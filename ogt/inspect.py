"""A summary of a model: versions, I/O, op histogram, parameters, BN / LayerNorm / Q-DQ counts."""

from __future__ import annotations

import dataclasses
from collections import Counter

from onnx import helper

from .graph import tensors
from .graph.model import Model
from .graph.patterns import decomposed_layernorms, default_reader
from .graph.query import GraphIndex
from .sparsity import WeightSparsity, format_sparsity, sparsity_report


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclasses.dataclass
class ModelSummary:
    path: str | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: int
    op_histogram: dict[str, int]
    parameters: int
    parameter_bytes: int
    batchnorm: int
    layernorm_op: int
    layernorm_decomposed: int
    qdq_pairs: int
    external_data: bool
    external_files: list[str]
    external_bytes: int
    sparsity: list[WeightSparsity] = dataclasses.field(default_factory=list)  # per weight: 2:4 pattern, eligibility

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(model: Model) -> ModelSummary:
    g = model.graph
    idx = GraphIndex(g)
    hist = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in g.node)
    params = list(model.iter_tensors())
    external = [t for t in params if tensors.is_external(t)]
    init_names = {t.name for t in g.initializer}
    return ModelSummary(
        path=str(model.source) if model.source else None,
        ir_version=model.proto.ir_version,
        opsets={imp.domain or "ai.onnx": imp.version for imp in model.proto.opset_import},
        producer=" ".join(x for x in (model.proto.producer_name, model.proto.producer_version) if x),
        inputs=[_spec(vi) for vi in g.input if vi.name not in init_names],
        outputs=[_spec(vi) for vi in g.output],
        nodes=len(g.node),
        op_histogram=dict(hist.most_common()),
        parameters=sum(tensors.element_count(t) for t in params),
        parameter_bytes=sum(tensors.nbytes(t) for t in params),
        batchnorm=hist.get("BatchNormalization", 0),
        layernorm_op=hist.get("LayerNormalization", 0),
        layernorm_decomposed=count_decomposed_layernorm(idx, model),
        qdq_pairs=count_qdq_pairs(idx),
        external_data=bool(external),
        external_files=sorted({tensors.external_ref(t).location for t in external}),
        external_bytes=sum(tensors.nbytes(t) for t in external),
        sparsity=sparsity_report(model),
    )


def _spec(vi) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = helper.tensor_dtype_to_string(tt.elem_type).replace("TensorProto.", "").lower() if tt.elem_type else "?"
    if not tt.HasField("shape"):
        return TensorSpec(vi.name, dtype, None)
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return TensorSpec(vi.name, dtype, shape)


def count_qdq_pairs(idx: GraphIndex) -> int:
    pairs = 0
    for node in idx.nodes:
        if node.op_type == "QuantizeLinear":
            pairs += sum(1 for c in idx.consumers.get(node.output[0], ()) if idx.nodes[c].op_type == "DequantizeLinear")
    return pairs


def count_decomposed_layernorm(idx: GraphIndex, model: Model | None = None) -> int:
    """LayerNorm written out as ReduceMean, Sub, Pow|Mul, ReduceMean, Add, Sqrt, Div|Reciprocal+Mul
    (the matcher in :mod:`ogt.graph.patterns`, shared with the transforms)."""
    read = (lambda t: model.array(t)) if model is not None else default_reader
    return len(decomposed_layernorms(idx, read))


def format_summary(s: ModelSummary, sparsity_detail: bool = False) -> str:
    def shape(spec: TensorSpec) -> str:
        return "?" if spec.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"

    lines = [
        f"model        {s.path or '(in memory)'}",
        f"ir_version   {s.ir_version}",
        "opsets       " + ", ".join(f"{d} {v}" for d, v in s.opsets.items()),
    ]
    if s.producer:
        lines.append(f"producer     {s.producer}")
    lines.append("inputs")
    lines += [f"  {i.name}: {i.dtype} {shape(i)}" for i in s.inputs]
    lines.append("outputs")
    lines += [f"  {o.name}: {o.dtype} {shape(o)}" for o in s.outputs]
    lines.append(f"parameters   {s.parameters:,} ({_bytes(s.parameter_bytes)})")
    lines.append(f"nodes        {s.nodes}")
    lines.append(f"BatchNormalization  {s.batchnorm}")
    lines.append(f"LayerNorm           {s.layernorm_op} op, {s.layernorm_decomposed} decomposed")
    lines.append(f"Q/DQ pairs          {s.qdq_pairs}")
    if s.external_data:
        lines.append(f"external data       {_bytes(s.external_bytes)} in {', '.join(s.external_files)}")
    else:
        lines.append("external data       none")
    lines += format_sparsity(s.sparsity, detail=sparsity_detail)
    lines.append("op histogram")
    lines += [f"  {op:<28}{n}" for op, n in s.op_histogram.items()]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


