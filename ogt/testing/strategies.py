"""Hypothesis strategies that generate valid ONNX graphs for property tests.

``bn_graphs()`` draws a chain of 1-3 blocks ``linear op -> BatchNormalization [-> Relu]`` where
the linear op is Conv (1-D or 2-D, groups, kernel, stride, pads, dilation), ConvTranspose
(groups), Gemm (transB 0/1), MatMul or MatMul+Add; weights as initializers or Constant nodes,
bias present or not, random epsilon. With ``negatives=True`` it also plants cases a folder must
refuse: a weight shared with another node, a producer output read elsewhere, a BN after a Relu,
a BN in training mode. Each example carries the counts a correct fold-batchnorm reports.

    @given(bn_graphs())
    def test_my_transform(g):
        after = my_transform(ogt.Model(copy(g.model)))
        assert_equivalent(g.model, after.graph)
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
CONV_OPS = ("Conv", "ConvTranspose")
DENSE_OPS = ("Gemm", "MatMul", "MatMulAdd")
NEGATIVES = ("shared-weight", "output-read-elsewhere", "after-relu", "training-mode")


@dataclasses.dataclass
class GeneratedGraph:
    """A generated model plus what fold-batchnorm should report on it."""

    model: onnx.ModelProto
    expected_counts: dict[str, int]
    planted: list[str]
    runnable: bool = True  # False when a planted case (training mode) makes onnxruntime refuse inference

    def __repr__(self) -> str:  # hypothesis prints this on failure
        ops = [n.op_type for n in self.model.graph.node]
        return f"GeneratedGraph(ops={ops}, expected={self.expected_counts}, planted={self.planted})"


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, hint: str, arr: np.ndarray, as_node: bool = False) -> str:
        name = self.name(hint)
        t = numpy_helper.from_array(arr.astype(np.float32), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=t))
        else:
            self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def bn(self, x: str, channels: int, eps: float, training: bool = False) -> str:
        r = self.rng
        params = [
            self.const("gamma", r.uniform(0.5, 1.5, channels)),
            self.const("beta", r.normal(0, 0.5, channels)),
            self.const("mean", r.normal(0, 0.5, channels)),
            self.const("var", r.uniform(0.2, 2.0, channels)),
        ]
        if not training:
            return self.node("BatchNormalization", [x, *params], "bn", epsilon=eps)
        out = self.name("bn")
        stats = [f"{out}_running_mean", f"{out}_running_var"]
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *params], [out, *stats], name=f"{out}_node", epsilon=eps, training_mode=1)
        )
        return out


@st.composite
def _conv_block(draw, b: _Builder, x: str, shape: list[int], op: str, as_node: bool):
    c_in, spatial = shape[1], shape[2:]
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0]))
    c_out = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 1))
    dil = draw(st.integers(1, 2)) if op == "Conv" else 1
    bias = draw(st.booleans())
    nd = len(spatial)
    if op == "Conv":
        out_sp = [(s + 2 * pad - dil * (k - 1) - 1) // stride + 1 for s in spatial]
        if min(out_sp) < 1:
            k, dil, pad = 1, 1, 0
            out_sp = [(s - 1) // stride + 1 for s in spatial]
        w = b.rng.normal(0, 0.5, (c_out, c_in // groups) + (k,) * nd)
    else:
        pad = min(pad, k - 1)
        out_sp = [(s - 1) * stride - 2 * pad + k for s in spatial]
        if min(out_sp) < 1:
            pad = 0
            out_sp = [(s - 1) * stride + k for s in spatial]
        w = b.rng.normal(0, 0.5, (c_in, c_out // groups) + (k,) * nd)
    inputs = [x, b.const("w", w, as_node)]
    if bias:
        inputs.append(b.const("b", b.rng.normal(0, 0.5, c_out), as_node))
    attrs = dict(group=groups, kernel_shape=[k] * nd, strides=[stride] * nd, pads=[pad] * (2 * nd))
    if op == "Conv":
        attrs["dilations"] = [dil] * nd
    y = b.node(op, inputs, op.lower(), **attrs)
    return y, [shape[0], c_out, *out_sp]


@st.composite
def _dense_block(draw, b: _Builder, x: str, shape: list[int], op: str, as_node: bool):
    f_in = shape[1]
    f_out = draw(st.integers(1, 6))
    bias = draw(st.booleans())
    if op == "Gemm":
        trans_b = draw(st.integers(0, 1))
        w = b.rng.normal(0, 0.5, (f_out, f_in) if trans_b else (f_in, f_out))
        inputs = [x, b.const("w", w, as_node)]
        if bias:
            inputs.append(b.const("c", b.rng.normal(0, 0.5, f_out), as_node))
        alpha = draw(st.sampled_from([1.0, 0.5]))
        beta = draw(st.sampled_from([1.0, 2.0]))
        y = b.node("Gemm", inputs, "gemm", transB=trans_b, alpha=alpha, beta=beta)
    else:
        y = b.node("MatMul", [x, b.const("w", b.rng.normal(0, 0.5, (f_in, f_out)), as_node)], "matmul")
        if op == "MatMulAdd":
            y = b.node("Add", [y, b.const("b", b.rng.normal(0, 0.5, f_out), as_node)], "add")
    return y, [shape[0], f_out]


@st.composite
def bn_graphs(draw, negatives: bool = False, max_blocks: int = 3) -> GeneratedGraph:
    """A random valid model of linear-op + BN blocks; see the module docstring."""
    b = _Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    family = draw(st.sampled_from(["conv1d", "conv2d", "dense"]))
    batch = 2
    if family == "dense":
        shape = [batch, draw(st.integers(1, 6))]
    else:
        nd = 1 if family == "conv1d" else 2
        shape = [batch, draw(st.sampled_from([1, 2, 3, 4, 6]))] + [draw(st.integers(3, 7)) for _ in range(nd)]
    x_in = "x"
    x = x_in
    in_shape = list(shape)
    expected: Counter[str] = Counter()
    planted: list[str] = []
    runnable = True
    n_blocks = draw(st.integers(1, max_blocks))
    plant_at = draw(st.integers(0, n_blocks - 1)) if negatives else -1
    for k in range(n_blocks):
        ops = CONV_OPS if family != "dense" else DENSE_OPS
        op = draw(st.sampled_from(ops))
        as_node = draw(st.booleans())
        block = _conv_block if family != "dense" else _dense_block
        y, shape = draw(block(b, x, shape, op, as_node))
        neg = draw(st.sampled_from(NEGATIVES)) if k == plant_at else None
        eps = draw(st.sampled_from([1e-5, 1e-3, 1e-2]))
        if neg == "shared-weight":
            w_name = _weight_of(b, y)
            side = b.node("Mul", [w_name, w_name], "wsq")
            b.outputs.append(helper.make_tensor_value_info(side, TensorProto.FLOAT, None))
        elif neg == "output-read-elsewhere":
            side = b.node("Relu", [y], "side")
            b.outputs.append(helper.make_tensor_value_info(side, TensorProto.FLOAT, None))
        elif neg == "after-relu":
            y = b.node("Relu", [y], "relu")
        if neg:
            planted.append(neg)
        training = neg == "training-mode"
        if training:
            runnable = False
        y = b.bn(y, shape[1], eps, training=training)
        if not training:
            expected[_fold_kind(op, neg)] += 1
        if draw(st.booleans()):
            y = b.node("Relu", [y], "relu")
        x = y
    graph = helper.make_graph(
        b.nodes,
        "generated",
        [helper.make_tensor_value_info(x_in, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None), *b.outputs],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ogt.testing")
    model.ir_version = 8
    counts = {f"fold-batchnorm.{k}": v for k, v in expected.items()}
    return GeneratedGraph(model, counts, planted, runnable)


def _weight_of(b: _Builder, y: str) -> str:
    """The weight input of the linear op behind ``y`` (through a MatMul's bias Add)."""
    by_out = {n.output[0]: n for n in b.nodes}
    node = by_out[y]
    if node.op_type == "Add":
        node = by_out[node.input[0]]
    return node.input[1]


def _fold_kind(op: str, negative: str | None) -> str:
    if negative in ("shared-weight", "output-read-elsewhere", "after-relu"):
        return "mul-add"
    return {"Conv": "conv", "ConvTranspose": "convtranspose", "Gemm": "gemm", "MatMul": "matmul", "MatMulAdd": "matmul-add"}[op]


@dataclasses.dataclass
class JunkGraph:
    """A generated model with planted junk and the counts cleanup must report."""

    model: onnx.ModelProto
    expected_counts: dict[str, int]
    shuffled_out_of_order: bool

    def __repr__(self) -> str:
        return f"JunkGraph(ops={[n.op_type for n in self.model.graph.node]}, expected={self.expected_counts})"


@st.composite
def cleanup_graphs(draw) -> JunkGraph:
    """A bn_graphs() model with planted Identity nodes, dead nodes, unused and duplicate constants,
    initializers listed as inputs and a shuffled node order."""
    base = draw(bn_graphs())
    m = onnx.ModelProto()
    m.CopyFrom(base.model)
    g = m.graph
    out = g.output[0].name
    expected: Counter[str] = Counter()
    n_id = draw(st.integers(0, 3))
    if n_id:  # an Identity chain on the main output path: x -> id -> id -> ... -> consumers
        producer = next(n for n in g.node if n.output[0] == out)
        prev = producer.output[0] = "pre_identity"
        for k in range(n_id):
            nxt = out if k == n_id - 1 else f"identity_{k}"
            g.node.append(helper.make_node("Identity", [prev], [nxt], name=f"identity_node_{k}"))
            prev = nxt
        expected["identity"] = n_id
    n_dead = draw(st.integers(0, 3))
    src = g.input[0].name
    for k in range(n_dead):  # a chain of dead nodes hanging off the input
        dst = f"dead_{k}"
        g.node.append(helper.make_node("Sigmoid", [src], [dst], name=f"dead_node_{k}"))
        src = dst
    expected["dead-node"] = n_dead
    n_unused = draw(st.integers(0, 2))
    for k in range(n_unused):
        g.initializer.append(numpy_helper.from_array(np.full(3, float(k), np.float32), f"unused_{k}"))
    expected["unused-initializer"] = n_unused
    if draw(st.booleans()):  # y + 0 + 0 with two identical zero constants: one duplicate
        final = g.output[0].name
        producer = next(n for n in g.node if n.output[0] == final)
        producer.output[0] = "pre_zeros"
        g.initializer.extend([numpy_helper.from_array(np.zeros(1, np.float32), n) for n in ("zero_a", "zero_b")])
        g.node.append(helper.make_node("Add", ["pre_zeros", "zero_a"], ["plus_zero"], name="add_zero_a"))
        g.node.append(helper.make_node("Add", ["plus_zero", "zero_b"], [final], name="add_zero_b"))
        expected["duplicate-constant"] = 1
    n_inputs = draw(st.integers(0, min(2, len(g.initializer))))
    for t in list(g.initializer)[:n_inputs]:
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    expected["initializer-input"] = n_inputs
    order = draw(st.permutations(list(range(len(g.node)))))
    nodes = [g.node[i] for i in order]
    del g.node[:]
    g.node.extend(nodes)
    out_of_order = _survivors_out_of_order(g)
    counts = {f"cleanup.{k}": v for k, v in expected.items() if v}
    if out_of_order:
        counts["cleanup.reordered"] = 1
    return JunkGraph(m, counts, out_of_order)


def _survivors_out_of_order(g: onnx.GraphProto) -> bool:
    """Whether the nodes cleanup keeps (not dead, not Identity) read anything produced later."""
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def root(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    kept = [n for n in g.node if n.op_type != "Identity" and not n.name.startswith("dead_node_")]
    produced_at = {root(o): i for i, n in enumerate(kept) for o in n.output}
    return any(produced_at.get(root(x), -1) > i for i, n in enumerate(kept) for x in n.input)


# --------------------------------------------------------------------------- transformer blocks

LN_NEGATIVES = ("nonlinear-reader", "gamma-ones")
#: migrate-gamma's default min_abs_gamma; generated gammas plant entries below it.
NEAR_ZERO_GAMMA = 1e-2


@dataclasses.dataclass
class BlockGraph:
    """A generated transformer-ish model plus what migrate-gamma and smoothquant should report."""

    model: onnx.ModelProto
    expected_counts: dict[str, int]  # migrate-gamma (defaults)
    expected_smooth: dict[str, int]  # smoothquant (layer counts; factors assumed != 1)
    planted: list[str]
    layernorms: list[str]  # "op" or "decomposed:<square>:<normalize>:<eps>", per block

    def __repr__(self) -> str:
        ops = [n.op_type for n in self.model.graph.node]
        return (f"BlockGraph(ops={ops}, ln={self.layernorms}, expected={self.expected_counts}, "
                f"smooth={self.expected_smooth}, planted={self.planted})")


def _ln_op(b: _Builder, x: str, gamma: np.ndarray, beta: np.ndarray | None, eps: float, as_node: bool) -> str:
    inputs = [x, b.const("gamma", gamma, as_node)]
    if beta is not None:
        inputs.append(b.const("beta", beta, as_node))
    return b.node("LayerNormalization", inputs, "ln", axis=-1, epsilon=eps)


def _reduce_mean(b: _Builder, x: str, opset: int) -> str:
    if opset >= 18:
        axes = b.name("axes")
        b.inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        return b.node("ReduceMean", [x, axes], "mean")
    return b.node("ReduceMean", [x], "mean", axes=[-1])


@st.composite
def _ln_decomposed(draw, b: _Builder, x: str, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float,
                   opset: int, as_node: bool) -> tuple[str, str]:
    square = draw(st.sampled_from(["pow", "mul"]))
    norm = draw(st.sampled_from(["div", "reciprocal", "reciprocal-swapped"]))
    eps_as = draw(st.sampled_from(["initializer", "constant-node"]))
    mean = _reduce_mean(b, x, opset)
    d = b.node("Sub", [x, mean], "d")
    if square == "pow":
        sq = b.node("Pow", [d, b.const("two", np.array(2.0))], "sq")
    else:
        sq = b.node("Mul", [d, d], "sq")
    var = _reduce_mean(b, sq, opset)
    e = b.const("eps", np.array(eps), eps_as == "constant-node")
    ve = b.node("Add", [var, e] if draw(st.booleans()) else [e, var], "ve")
    std = b.node("Sqrt", [ve], "std")
    if norm == "div":
        y = b.node("Div", [d, std], "n")
    else:
        r = b.node("Reciprocal", [std], "r")
        y = b.node("Mul", [d, r] if norm == "reciprocal" else [r, d], "n")
    if gamma is not None:
        g = b.const("gamma", gamma, as_node)
        y = b.node("Mul", [y, g] if draw(st.booleans()) else [g, y], "s")
    if beta is not None:
        c = b.const("beta", beta, as_node)
        y = b.node("Add", [y, c] if draw(st.booleans()) else [c, y], "ln")
    return y, f"decomposed:{square}:{norm}:{eps_as}"


def _gamma(draw, rng: np.random.Generator, width: int) -> np.ndarray:
    """Random gamma with negative entries, some near zero (below NEAR_ZERO_GAMMA) and a large one."""
    g = rng.normal(0.0, 1.0, width)
    g[0] = rng.uniform(0.2, 3.0) * rng.choice([-1.0, 1.0])  # at least one entry migrates
    n_small = draw(st.integers(0, width - 1))
    if n_small:
        picks = rng.choice(np.arange(1, width), n_small, replace=False)
        g[picks] = rng.choice([0.0, 1e-5, -3e-4, 5e-3], n_small)
    big = np.abs(g) >= NEAR_ZERO_GAMMA
    g[big & (np.abs(g) < 0.05)] = 0.5  # nothing borderline: keeps the expected counts exact
    return g


@st.composite
def _block(draw, b: _Builder, x: str, shape: list[int], opset: int, planted: str | None,
           mg: Counter[str], sq: Counter[str], extra_out: list[str]) -> tuple[str, str]:
    width = shape[-1]
    post = draw(st.booleans())
    form = draw(st.sampled_from(["op", "decomposed"]))
    as_node = draw(st.booleans())
    gamma = _gamma(draw, b.rng, width)
    beta = b.rng.normal(0, 0.5, width) if draw(st.booleans()) else None
    eps = draw(st.sampled_from([1e-12, 1e-5, 1e-3]))
    if planted == "gamma-ones":
        gamma = np.ones(width) if form == "op" else None
    if form == "op":
        h = _ln_op(b, x, gamma, beta, eps, as_node)
        label = "op"
    else:
        h, label = draw(_ln_decomposed(b, x, gamma, beta, eps, opset, as_node))
    # linear readers of h: 1-3 layers of width -> width, summed
    n_lin = draw(st.integers(1, 3))
    kinds = [draw(st.sampled_from(["MatMul", "MatMulAdd"] + (["Gemm"] if len(shape) == 2 else []))) for _ in range(n_lin)]
    weights, ys = [], []
    for kind in kinds:
        if kind == "Gemm":
            trans_b = draw(st.integers(0, 1))
            w = b.const("w", b.rng.normal(0, 0.5, (width, width)), draw(st.booleans()))
            inputs = [h, w] + ([b.const("c", b.rng.normal(0, 0.5, width))] if draw(st.booleans()) else [])
            ys.append(b.node("Gemm", inputs, "gemm", transB=trans_b, alpha=draw(st.sampled_from([1.0, 0.5]))))
        else:
            w = b.const("w", b.rng.normal(0, 0.5, (width, width)), draw(st.booleans()))
            y = b.node("MatMul", [h, w], "matmul")
            if kind == "MatMulAdd":
                y = b.node("Add", [y, b.const("b", b.rng.normal(0, 0.5, width))], "bias")
            ys.append(y)
        weights.append(w)
    y = ys[0]
    for other in ys[1:]:
        y = b.node("Add", [y, other], "sum")
    lin_counts = Counter("gemm" if k == "Gemm" else "matmul" for k in kinds)
    shared = draw(st.booleans()) and not any(k == "Gemm" for k in kinds)
    if shared:  # the first weight is also read by a MatMul of the block input
        side = b.node("MatMul", [x, weights[0]], "side")
        extra_out.append(side)
    scaled_residual = post and draw(st.booleans())
    if post:
        r = b.node("Mul", [h, b.const("rs", b.rng.uniform(0.5, 1.5, width))], "rscale") if scaled_residual else h
        out = b.node("Add", [r, y], "res")
    else:
        out = b.node("Add", [x, y], "res")
    h_is_output = draw(st.booleans())
    if h_is_output:
        extra_out.append(h)
    if planted == "nonlinear-reader":
        extra_out.append(b.node("Relu", [h], "relu"))
    restore = (post and not scaled_residual) or h_is_output or planted == "nonlinear-reader"
    common = Counter(lin_counts)
    common["mul-folded"] += int(scaled_residual)
    if planted is None:
        mg[f"layernorm-{form}"] += 1
        mg.update(common)
        mg["residual-mul"] += int(restore)
        mg["kept-channel"] += int(np.count_nonzero((np.abs(gamma) < NEAR_ZERO_GAMMA) & (gamma != 1)))
        mg["shared-weight-copied"] += int(shared)
    sq.update(lin_counts)
    sq["matmul"] += int(shared)
    sq["shared-weight-copied"] += 2 * int(shared)  # the LN's layer and the side layer each get a copy
    sq["mul"] += int(shared)
    if planted == "nonlinear-reader":
        sq["mul"] += 1  # LayerNorm not foldable: a Mul in front of its linear readers
    else:
        sq["layernorm"] += 1
        sq["residual-mul"] += int(restore)
        sq.update(Counter({"mul-folded": common["mul-folded"]}))
    return out, label


@st.composite
def transformer_blocks(draw, negatives: bool = False, max_blocks: int = 2) -> BlockGraph:
    """1-``max_blocks`` pre-LN or post-LN blocks ``h = LN(x); y = sum of linear(h); out = h + y | x + y``.

    LayerNorm as the op or decomposed (Pow or x*x, Div or Reciprocal+Mul in either order, epsilon
    as initializer or Constant node, ReduceMean axes as attribute (opset 17) or input (opset 18),
    gamma/beta operand order); gamma with negative and near-zero entries, beta optional; 1-3
    linear readers (MatMul, MatMul+Add, Gemm with transB 0/1 on 2-D inputs; weights as
    initializers or Constant nodes); optionally a weight shared with a MatMul of the block input,
    a residual scaled by a constant Mul, the LayerNorm output as a graph output. With
    ``negatives=True`` one block gets a non-linear reader (Relu) of the LayerNorm output or a
    gamma of ones (decomposed: no gamma Mul). Carries the counts migrate-gamma (default options)
    and smoothquant report.
    """
    b = _Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    opset = draw(st.sampled_from([17, 18]))
    width = draw(st.integers(2, 8))
    shape = [2, width] if draw(st.booleans()) else [2, draw(st.integers(1, 4)), width]
    n_blocks = draw(st.integers(1, max_blocks))
    plant_at = draw(st.integers(0, n_blocks - 1)) if negatives else -1
    mg: Counter[str] = Counter()
    sq: Counter[str] = Counter()
    planted: list[str] = []
    labels: list[str] = []
    extra: list[str] = []
    x = "x"
    for k in range(n_blocks):
        neg = draw(st.sampled_from(LN_NEGATIVES)) if k == plant_at else None
        if neg:
            planted.append(neg)
        x, label = draw(_block(b, x, shape, opset, neg, mg, sq, extra))
        labels.append(label)
    outputs = [x, *dict.fromkeys(o for o in extra if o != x)]
    graph = helper.make_graph(
        b.nodes,
        "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ogt.testing")
    model.ir_version = 8
    return BlockGraph(
        model,
        {f"migrate-gamma.{k}": v for k, v in sorted(mg.items()) if v},
        {f"smoothquant.{k}": v for k, v in sorted(sq.items()) if v},
        planted,
        labels,
    )
