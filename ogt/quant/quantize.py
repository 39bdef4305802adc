"""The quantize pipeline: fold-batchnorm, cleanup, calibration, insert-qdq, and a fidelity report.

``quantize(model, source, QuantizeOptions(...))`` mutates ``model`` into its QDQ form and returns
a QuantizeResult with the calibration table, what each step did, per-tensor quantization
parameters, a per-layer error table (SQNR of every quantized layer's output against the float
model on the calibration data) and the fidelity of the graph outputs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from ..calib.collect import calibrate
from ..calib.collect import choose_batch
from ..calib.data import CalibrationSource, batch_len, check_source, limit, rebatched, takes_any_batch
from ..calib.qparams import compute_qparams
from ..calib.table import CalibrationTable
from ..graph.build import make_node, rebuild_nodes
from ..errors import UnsupportedModelError
from ..graph.model import Model
from ..graph.names import NameAllocator
from ..graph.query import GraphIndex
from ..testing.equivalence import Runner
from ..transforms import Cleanup, FoldBatchNorm, FoldShapes, MigrateGamma, Pipeline, Skip, SmoothQuant, TransformContext, TransformResult
from .insert_qdq import InsertQDQ, TensorOverride
from .profiles import WEIGHTED_OPS, get_profile
from .bias_correction import ChannelMean, CorrectBias, input_channel_axis
from .noisy_bias import NoisyBiasOptions
from .refine import RefineOptions, Refined, output_error, reference_outputs, refine_blocks, refine_table
from .token_clip import DEFAULT_ALPHAS, search_alpha, token_taps


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    method: str = "minmax"
    target: str = "ort"
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, TensorOverride] = dataclasses.field(default_factory=dict)
    placement: str = "auto"  # "auto" | "full" | "weighted"
    observer_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    progress: bool = True
    #: samples per onnxruntime run; None: batch a one-sample-per-batch source up to AUTO_BATCH
    #: samples within AUTO_BATCH_BYTES of calibrated tensors (see auto_batch), when the model
    #: takes any batch size. Batching changes no result, only speed and memory.
    batch_size: int | None = None
    report_samples: int = 16
    placement_samples: int = 8
    placement_gain_db: float = 1.0
    migrate_gamma: bool = False
    smoothquant: float | str | None = None  # alpha, "auto", or None (off)
    smoothquant_samples: int = 32
    token_clip_alphas: tuple[float, ...] = DEFAULT_ALPHAS
    int4: bool = False  # <= 4-bit tensors in the INT4/UINT4 types (the model is converted to opset 21)
    bias_correction: bool = True
    #: layers bias correction touches; None: Conv and Gemm, plus MatMul when weights have fewer than
    #: 8 bits. Measured: at 8-bit weights correcting MiniLM's MatMuls cost a little (embedding cosine
    #: 0.99796 -> 0.99784: the means include padded tokens); at 6-bit weights it is worth a lot
    #: (all-MiniLM-L6 W6A6 token-clip: 0.901 without, 0.956 with). CNNs gain 1 dB at 8 bits.
    bias_correction_ops: tuple[str, ...] | None = None

    def corrected_ops(self) -> tuple[str, ...]:
        if self.bias_correction_ops is not None:
            return tuple(self.bias_correction_ops)
        return ("Conv", "Gemm", "MatMul") if self.weight_bits < 8 else ("Conv", "Gemm")
    #: how each weight channel's range is chosen ("minmax" | "mse"); None: "mse" below 8-bit weights.
    #: Measured on paraphrase-MiniLM-L3 W6A6 token-clip (embedding cosine mean / worst): minmax
    #: 0.9813 / 0.9714, mse 0.9831 / 0.9745; at W8A6 the two agree to 0.0002.
    weight_method: str | None = None

    def weights_by(self) -> str:
        if self.weight_method is not None:
            return self.weight_method
        return "mse" if self.weight_bits < 8 else "minmax"
    bias_samples: int = 16  # channel means settle fast; measured: 16 and 64 give the same MobileNetV2 fidelity
    refine: bool = False
    refine_options: RefineOptions = RefineOptions()
    noisy_bias: bool = False  # NoisyQuant: searched fixed noise before the inputs of linear layers
    noisy_bias_options: NoisyBiasOptions = NoisyBiasOptions()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")

    def insert_qdq(self, table: CalibrationTable | None = None, drop_ops: tuple[str, ...] = ()) -> InsertQDQ:
        return InsertQDQ(
            table=table,
            target=self.target,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            per_channel=self.per_channel,
            exclude=self.exclude,
            overrides=self.overrides,
            weighted_only=self.placement == "weighted",
            keep_float_ops=drop_ops,
            int4=self.int4,
            weight_method=self.weights_by(),
        )


PLACEMENTS = ("auto", "full", "weighted")
#: calibration methods: the observers' plus token-clip, which needs the model to score its alpha
METHODS = ("minmax", "percentile", "entropy", "mse", "token-clip")


@dataclasses.dataclass(frozen=True)
class LayerError:
    node: str
    op_type: str
    output: str
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class OutputFidelity:
    name: str
    sqnr_db: float
    cosine_mean: float
    cosine_min: float


@dataclasses.dataclass
class QuantizeResult:
    model: Model
    table: CalibrationTable
    steps: list[TransformResult]
    layers: list[LayerError]
    outputs: list[OutputFidelity]
    options: QuantizeOptions
    placement: dict = dataclasses.field(default_factory=dict)
    refined: list[Refined] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> list[Skip]:
        return [s for step in self.steps for s in step.skipped]

    @property
    def counts(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for step in self.steps:
            merged.update(step.counts)
        return merged

    def scales(self) -> dict[str, dict[str, float]]:
        """Per-tensor activation quantization parameters, as insert-qdq computed them."""
        scheme = get_profile(self.options.target).act_scheme(self.options.act_bits)
        out = {}
        for name, r in sorted(self.table.ranges.items()):
            scale, zp = compute_qparams(r.lo, r.hi, scheme)
            out[name] = {"scale": float(scale), "zero_point": int(zp), "lo": r.lo, "hi": r.hi, "min": r.min, "max": r.max}
        return out

    def as_dict(self) -> dict:
        o = self.options
        return {
            "target": o.target,
            "method": o.method,
            "weight_bits": o.weight_bits,
            "act_bits": o.act_bits,
            "weight_method": o.weights_by(),
            "per_channel": o.per_channel,
            "calibration_samples": self.table.samples,
            "counts": self.counts,
            "steps": [s.as_dict() for s in self.steps],
            "skipped": [s.as_dict() for s in self.skipped],
            "scales": self.scales(),
            "layers": [dataclasses.asdict(x) for x in self.layers],
            "outputs": [dataclasses.asdict(x) for x in self.outputs],
            "placement": self.placement,
            "refined": [dataclasses.asdict(r) for r in self.refined],
            **self.extra,
        }


def quantize(model: Model, source: CalibrationSource, options: QuantizeOptions = QuantizeOptions()) -> QuantizeResult:
    """Quantize ``model`` in place; see the module docstring."""
    check_source(model, source)
    prep = [FoldBatchNorm(), FoldShapes(), Cleanup()]
    if options.migrate_gamma:
        prep.append(MigrateGamma())
    if options.smoothquant is not None:
        prep.append(SmoothQuant(data=limit(source, options.smoothquant_samples), alpha=options.smoothquant,
                                weight_bits=options.weight_bits, act_bits=options.act_bits))
    steps = list(Pipeline(prep)(model).children)
    if options.int4 and min(options.weight_bits, options.act_bits) <= 4 and (model.opset("") or 0) < 21:
        to_opset_21(model)
    planner = options.insert_qdq()
    plan = planner.plan(model)
    scheme = planner.profile.act_scheme(options.act_bits)
    if options.bias_correction:
        steps.append(correct_bias(model, source, plan, planner, options))
    # after bias correction: the size probe's session is reused by calibrate and must see the corrected model
    source, probe = batched(model, source, plan.tensors_to_calibrate(), options.batch_size)
    token_clip = options.method == "token-clip"
    taps = token_taps(plan.tensors_to_calibrate()) if token_clip else {}
    table = calibrate(
        model,
        source,
        method="minmax" if token_clip else options.method,
        tensors=plan.tensors_to_calibrate(),
        scheme=scheme,
        observer_options=dict(options.observer_options),
        progress=options.progress,
        taps=taps,
        probe=probe,
    )
    reference = model.copy()
    idx = GraphIndex(model.graph)
    # one float session for placement and the report: graph outputs plus every layer output
    run_ref = Runner(reference, [_after_bias_add(idx, idx.nodes[i]) for i, _, _ in plan.weights])
    placement = choose_placement(reference, table, source, options, run_ref)
    kept = tuple(placement["kept_float"])
    extra: dict = {}
    if token_clip:
        table, search = search_alpha(reference, table, taps, source, options.insert_qdq(table, kept),
                                     options.token_clip_alphas, options.placement_samples, run_ref)
        extra["token_clip"] = {"alpha": search.alpha, "output_mse": {str(a): v for a, v in search.scores.items()}}
    refined: list[Refined] = []
    if token_clip:  # the fine stage: every quantizer, on its block's output, in order
        table, refined = refine_blocks(reference, table, source, options.insert_qdq(table, kept), options.refine_options)
    elif options.refine:
        table, refined = refine_table(reference, table, source, options.insert_qdq(table, kept), options.refine_options)
    qdq = options.insert_qdq(table, kept)(model)
    post = []
    if options.noisy_bias:
        post.append(options.noisy_bias_options.transform(reference, source, options.target)(model))
        extra["noisy_bias"] = [row.as_dict() for row in post[-1].layers]
    layers, outputs = measure_fidelity(reference, model, source, options.report_samples, run_ref)
    return QuantizeResult(model, table, [*steps, qdq, *post], layers, outputs, options, placement, refined, extra)


#: Automatic batching: at most this many samples per run, and at most this many bytes of
#: calibrated tensors per run. Measured with ``ogt quantize --method percentile`` on this 2-core
#: machine (time s / peak RSS MB at 1, 2, 4, 8 samples per run): MiniLM-L3 (13 MB of calibrated
#: tensors per sample) 4.8/610, 3.8/610, 3.1/609, 2.9/635; MobileNetV2 (27 MB per sample)
#: 4.2/339, 4.0/438, 4.6/719, 6.0/1190. Small transformer activations gain from batching,
#: large CNN activations only cost memory.
AUTO_BATCH = 8
AUTO_BATCH_BYTES = 64 << 20


def batched(model: Model, source: CalibrationSource, tensors: list[str],
            batch_size: int | None) -> tuple[CalibrationSource, dict | None]:
    """``source`` regrouped to ``batch_size`` samples per run, or when None to what
    :func:`~ogt.calib.collect.choose_batch` picks (only for a source of single samples and a model
    that takes any batch size). Also returns the size probe for calibrate to reuse."""
    probe = None
    if batch_size is None:
        first = source.peek()
        if first is None or batch_len(first) != 1 or not takes_any_batch(model):
            return source, None  # the source chose its batches (or the model fixes them)
        batch_size, probe = choose_batch(model, first, tensors, most=AUTO_BATCH, budget_bytes=AUTO_BATCH_BYTES)
    return (rebatched(source, batch_size) if batch_size > 1 else source), probe


def to_opset_21(model: Model) -> None:
    """Convert ``model`` in place to opset 21, where QuantizeLinear/DequantizeLinear take INT4/UINT4."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model.proto, 21)
    except Exception as exc:  # noqa: BLE001 - the converter raises several unrelated types
        raise UnsupportedModelError(
            f"--int4 needs opset 21 and onnx's version converter cannot convert this model from opset "
            f"{model.opset('')}: {exc}"
        ) from None
    model.proto.CopyFrom(converted)


def correct_bias(model: Model, source: CalibrationSource, plan, planner: InsertQDQ, options: QuantizeOptions) -> TransformResult:
    """Gather the weighted layers' input channel means (one streaming pass over up to
    ``bias_samples`` samples) and run correct-bias with them."""
    idx = GraphIndex(model.graph)
    taps: dict[str, ChannelMean] = {}
    for i, _, _ in plan.weights:
        node = idx.nodes[i]
        if node.input[0] in plan.activations and node.op_type in options.corrected_ops():
            taps.setdefault(node.input[0], ChannelMean(input_channel_axis(node.op_type)))
    if not taps:
        return TransformResult(model, False, {}, [], name=CorrectBias.name)
    calibrate(model, limit(source, options.bias_samples), method="minmax", tensors=list(taps), progress=False, taps=taps)
    means = {name: tap.mean for name, tap in taps.items() if tap.mean is not None}
    return CorrectBias(means, planner, options.corrected_ops())(model)


def choose_placement(reference: Model, table: CalibrationTable, source: CalibrationSource, options: QuantizeOptions,
                     run_ref: Runner | None = None) -> dict:
    """``auto``: start from the full placement; keep an op family's inputs float when that alone
    raises the output SQNR on calibration data by more than ``placement_gain_db``. With the ``ort``
    target, families that carry the output Q of a Conv/ConvTranspose/Gemm are never tried: that
    Q is what lets onnxruntime run those layers as integer kernels.

    Transformers lose most of their fidelity to Q/DQ on the residual and bias Adds (outliers), CNNs
    need those Q/DQ for onnxruntime's integer fusion and lose nothing: the data decides.
    """
    if options.placement != "auto":
        return {"mode": options.placement, "kept_float": [], "trials": {}}
    plan = options.insert_qdq(table).plan(reference)
    idx = GraphIndex(reference.graph)
    families = Counter(idx.nodes[i].op_type for slots in plan.activations.values() for i, _ in slots)
    families = Counter({op: n for op, n in families.items() if op not in WEIGHTED_OPS})
    needed = _fusion_critical(idx, plan, get_profile(options.target))
    families = Counter({op: n for op, n in families.items() if op not in needed})
    if not families:
        return {"mode": "auto", "kept_float": [], "fusion_critical": sorted(needed), "trials": {}}
    batches = list(limit(source, options.placement_samples))
    expected = reference_outputs(run_ref or Runner(reference), reference, batches)
    trial, flags = switchable_qdq(reference, options.insert_qdq(table), set(families))
    run_trial = Runner(trial)

    def score(kept: list[str]) -> float:
        switches = {flag: np.asarray(op not in kept) for op, flag in flags.items()}
        return _output_sqnr(run_trial, [{**b, **switches} for b in batches], expected)

    kept: list[str] = []
    best = score(kept)
    trials = {"full": best}
    for op, _ in families.most_common():
        trials[f"without {op}"] = s = score([*kept, op])
        if s > best + options.placement_gain_db:
            kept.append(op)
            best = s
    return {
        "mode": "auto",
        "kept_float": kept,
        "fusion_critical": sorted(needed),
        "trials": {k: round(v, 2) for k, v in trials.items()},
    }


def switchable_qdq(reference: Model, transform: InsertQDQ, families: set[str]) -> tuple[Model, dict[str, str]]:
    """A copy of ``reference`` with ``transform``'s Q/DQ inserted, where every input of an op in
    ``families`` that insertion rewired reads ``Where(flag, dequantized, float)``: one session
    scores every keep-float combination (a boolean scalar input per family, true = quantized),
    exactly as if insertion had kept those families float. Only for scoring; never saved."""
    trial = reference.copy()
    names = NameAllocator(trial.graph)
    was: dict[str, list[str]] = {}
    for node in trial.graph.node:
        if node.op_type in families:
            node.name = names.new(f"{node.name or node.op_type}_trial")
            was[node.name] = list(node.input)
    transform(trial, TransformContext(validate=False))
    flags = {op: names.new(f"quantize_{op}") for op in sorted(families)}
    replacements: dict[int, list] = {}
    for i, node in enumerate(trial.graph.node):
        for k, original in enumerate(was.get(node.name, ())):
            if node.input[k] != original:
                sel = names.new(f"{original}_switched")
                where = make_node("Where", [flags[node.op_type], node.input[k], original], [sel], names, f"{sel}_where")
                replacements.setdefault(i, []).append(where)
                node.input[k] = sel
    rebuild_nodes(trial.graph, {i: [*nodes, trial.graph.node[i]] for i, nodes in replacements.items()})
    for flag in flags.values():
        trial.graph.input.append(onnx.helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
    return trial, flags


#: Ops whose integer kernels in onnxruntime need their *output* quantized (no float-output
#: variant, unlike MatMul's MatMulIntegerToFloat): the Q after them comes from their consumers.
_NEEDS_OUTPUT_Q = {"Conv", "ConvTranspose", "Gemm"}


def _fusion_critical(idx: GraphIndex, plan, profile) -> set[str]:
    """Op families whose input Q/DQ is the output Q of a Conv/ConvTranspose/Gemm (``ort`` only):
    keeping them float would stop onnxruntime fusing those layers into integer kernels."""
    if profile.name != "ort":
        return set()
    critical = set()
    for name, slots in plan.activations.items():
        producer = idx.producer_of(name)
        while producer is not None and producer.op_type in ("Relu", "Clip"):  # fused into the Q after them
            producer = idx.producer_of(producer.input[0])
        if producer is not None and producer.op_type in _NEEDS_OUTPUT_Q:
            critical.update(idx.nodes[i].op_type for i, _ in slots)
    return critical - WEIGHTED_OPS


def _output_sqnr(run: Runner, batches: list, expected: list) -> float:
    signal, noise, _ = output_error(run, batches, expected)
    return _sqnr(signal, noise)


def quantized_layers(model: Model) -> list[tuple[str, str, str]]:
    """(node name, op type, output) of every weighted op whose weight is dequantized."""
    idx = GraphIndex(model.graph)
    out = []
    for node in idx.nodes:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            p = idx.producer_of(node.input[1])
            if p is not None and p.op_type == "DequantizeLinear":
                out.append((node.name, node.op_type, _after_bias_add(idx, node)))
    return out


def _after_bias_add(idx: GraphIndex, node) -> str:
    """A MatMul's output after its bias Add (its one reader, with a constant operand): the layer's
    output, which noisy-bias keeps equal to float while the bare MatMul output carries ``N W``."""
    y = node.output[0]
    users = idx.consumers.get(y, [])
    if node.op_type == "MatMul" and len(users) == 1 and y not in idx.graph_outputs:
        add = idx.nodes[users[0]]
        if add.op_type == "Add" and len(add.input) == 2 and any(n != y and idx.is_constant(n) for n in add.input):
            return add.output[0]
    return y


def measure_fidelity(
    reference: Model, quantized: Model, source: CalibrationSource, max_samples: int, run_ref: Runner | None = None
) -> tuple[list[LayerError], list[OutputFidelity]]:
    """SQNR of each quantized layer's output and of each graph output, plus output cosine, on up to ``max_samples``."""
    layers = quantized_layers(quantized)
    names = [o for _, _, o in layers]
    graph_outputs = [o.name for o in reference.graph.output]
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    cosines: dict[str, list[np.ndarray]] = {n: [] for n in graph_outputs}
    if run_ref is None or not set(names) <= set(run_ref.names):
        run_ref = Runner(reference, names)
    run_q = Runner(quantized, names)
    for batch in limit(source, max_samples):
        a, b = run_ref(batch), run_q(batch)
        for n in set(names) | set(graph_outputs):
            if n in a and n in b:
                ref, q = a[n].astype(np.float64), b[n].astype(np.float64)
                signal[n] = signal.get(n, 0.0) + float((ref**2).sum())
                noise[n] = noise.get(n, 0.0) + float(((ref - q) ** 2).sum())
        for n in graph_outputs:
            if n in a and n in b and a[n].ndim >= 1:
                cosines[n].append(_cosine(a[n], b[n]))
    layer_rows = [LayerError(node, op, out, _sqnr(signal.get(out), noise.get(out))) for node, op, out in layers if out in signal]
    outputs = []
    for n in graph_outputs:
        cos = np.concatenate(cosines[n]) if cosines[n] else np.array([np.nan])
        outputs.append(OutputFidelity(n, _sqnr(signal.get(n), noise.get(n)), float(np.nanmean(cos)), float(np.nanmin(cos))))
    return layer_rows, outputs


def _sqnr(signal: float | None, noise: float | None) -> float:
    if signal is None or noise is None:
        return float("nan")
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-300) / noise))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), 1.0)
