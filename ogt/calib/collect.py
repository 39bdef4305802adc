"""Collect activation statistics by running the model in onnxruntime, batch by batch.

``calibrate(model, source)`` exposes the tensors to calibrate as extra graph outputs, runs
every batch of ``source`` through onnxruntime, folds each exposed tensor into its streaming
observer (see :mod:`ogt.calib.observers`) and drops the outputs before the next batch, so
memory holds one batch's exposed tensors and never grows with the number of samples.

Memory: the bytes one batch exposes are estimated from the inferred shapes (symbolic dims
bound from the first batch's input shapes; tensors whose size inference cannot tell are
measured by running one sample). If exposing everything would exceed
``memory_budget_bytes``, the tensors are split, in graph order, into groups that fit, and the
source is read once per group. Each pass runs only the part of the graph its group needs (a
group early in the graph costs a fraction of a full run). A one-shot source that needs several
passes is spilled to a temporary folder of ``.npy`` files on the first pass and read back from
there, one batch at a time.

Session: the CPU execution provider (or ``providers``) with graph optimisations disabled, so the
values observed are those of the graph as written (the graph that gets quantised), identical
whichever tensors a pass exposes. (Measured on MobileNetV2 with every activation exposed:
ORT_ENABLE_BASIC builds the same graph and runs no faster, since exposing a tensor already
blocks the fusions; but when a pass exposes only some tensors it fuses Conv+BN around the
others and the values move by an ulp.) onnxruntime's default thread pools, spin-waiting off so
its workers do not compete with the observers between runs. (Running the next batch in
onnxruntime while the observers fold this one was measured on 2 cores: no faster, and it keeps
two batches of outputs alive, so it is not done.) Models with external data are loaded from memory with their data read in place (no copy).

The result is a :class:`~ogt.calib.table.CalibrationTable` bound to the model's fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from .data import batch_len
from ..errors import CalibrationError
from ..graph.model import Model, subgraphs
from ..graph.query import TensorInfo, infer_types, node_reads
from ..runtime import session_from_proto
from .observers import Observer, make_observer
from .qparams import QScheme
from .table import CalibrationTable, TensorRange, graph_fingerprint

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
#: Graph optimisation for calibration runs (see the module docstring and the measurements in the PR note).
OPT_LEVEL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
Batch = dict[str, np.ndarray]
DEFAULT_SCHEME = QScheme()


def calibrate(
    model: Model,
    source: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "minmax",
    tensors: Sequence[str] | None = None,
    scheme: QScheme = DEFAULT_SCHEME,
    observer_options: dict | None = None,
    memory_budget_bytes: int = 512 * 2**20,
    progress: bool = True,
    providers: Sequence = ("CPUExecutionProvider",),
    taps: Mapping[str, Callable[[np.ndarray], None]] | None = None,
    probe: dict | None = None,
) -> CalibrationTable:
    """Per-tensor activation ranges of ``model`` over the batches of ``source``.

    source: batches ``{input_name: array}`` with samples on axis 0 (a CalibrationSource, a list,
        a generator...). ``num_samples`` and ``reiterable`` are used when the source has them.
    method: ``minmax`` | ``percentile`` | ``entropy`` | ``mse``; ``observer_options`` go to its
        observer (e.g. ``{"percentile": 99.99}``, ``{"bins": 4096}``).
    tensors: names to calibrate (default :func:`activation_tensors`). Names that are not
        tensors of the top-level graph (inside a subgraph, or unknown) are left out with a warning.
    scheme: the quantisation scheme the clip ranges are chosen for (per-tensor: ``axis=None``).
    memory_budget_bytes: most bytes of exposed tensors per batch; more means several passes.
    progress: show a progress bar (on a terminal) over the samples.
    taps: extra per-tensor consumers called with every batch's value of a calibrated tensor
        (streaming statistics beside the ranges, e.g. the channel means bias correction needs).
    probe: the size probe :func:`choose_batch` left (its one-sample session is reused).
    """
    if scheme.axis is not None:
        raise ValueError("calibrate computes per-tensor activation ranges; use a scheme with axis=None")
    options = dict(observer_options or {})
    template = make_observer(method, **options)
    if template.axis is not None:
        raise ValueError("calibrate computes per-tensor ranges; do not pass 'axis' in observer_options")
    types = infer_types(model)
    names = _exposable(model, list(dict.fromkeys(tensors)) if tensors is not None else activation_tensors(model, types))
    observers: dict[str, Observer] = {n: make_observer(method, **options) for n in names}
    inputs = _input_names(model)

    reader = _Reader(source)
    first = reader.first()
    if first is None:
        raise CalibrationError("the calibration source is empty: it yielded no batches")
    _check_batch(first, inputs, 0)
    if not names:
        log.warning("no tensors to calibrate; the calibration table is empty")
        samples = sum(batch_len(b) for _, b in reader.batches(0, spill=False, stack=contextlib.ExitStack()))
        return _table(model, method, samples, scheme, template, observers)
    if probe is not None and set(probe.get("per_sample", ())) == set(names):  # choose_batch measured these
        sizes = {n: b * batch_len(first) for n, b in probe["per_sample"].items()}
    else:
        probe = {}
        sizes = _estimate_bytes(model, names, types, first, providers, probe)
    groups = plan_groups(names, sizes, memory_budget_bytes)
    if len(groups) > 1:
        log.info("calibrating %d tensors in %d passes (memory budget %d MiB per batch)",
                 len(names), len(groups), memory_budget_bytes >> 20)

    samples = None
    total = reader.num_samples
    with _progress(progress, None if total is None else total * len(groups)) as bar, contextlib.ExitStack() as stack:
        for g, group in enumerate(groups):
            if len(groups) > 1:
                bar.set_description(f"calibrating (pass {g + 1}/{len(groups)})")
            reuse = probe.get("session") if set(probe.get("names", ())) == set(group) else None
            session = reuse or _session(model, group, types, providers)  # the size probe's session when it fits
            probe.clear()
            batches = reader.batches(g, spill=len(groups) > 1, stack=stack)
            n = _run_pass(session, group, batches, observers, inputs, bar, taps or {})
            if samples is not None and n != samples:
                raise CalibrationError(
                    f"the calibration source yielded {samples} samples on its first read and {n} on read {g + 1}; "
                    "a source read in several passes must yield the same data each time"
                )
            samples = n
            del session
    return _table(model, method, samples or 0, scheme, template, observers)


def observe_tensors(
    model: Model,
    source: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    update: Callable[[Mapping[str, np.ndarray]], None],
    *,
    what: str,
    exposing: str,
) -> int:
    """Run ``model`` over every batch of ``source`` exposing ``names`` (graph inputs or top-level node
    outputs) in one session, hand each batch's values to ``update``; return the sample count.

    For small per-channel statistics (SmoothQuant's absmax, Wanda's channel norms): one session,
    no memory budget. ``what`` and ``exposing`` word the errors (``cannot <what> [...]``,
    ``onnxruntime cannot load the model exposing <exposing>``).
    """
    from ..testing.equivalence import Runner

    known = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output if o}
    missing = [n for n in names if n not in known]
    if missing:
        raise CalibrationError(f"cannot {what} {missing}: not activations of the top-level graph")
    try:
        runner = Runner(model, list(names))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise CalibrationError(f"onnxruntime cannot load the model exposing {exposing}: {exc}") from None
    unseen = [n for n in names if n not in runner.names]
    if unseen:
        raise CalibrationError(f"cannot expose {unseen} as outputs: shape inference does not know their type")
    feed_names = {i.name for i in runner.session.get_inputs()}
    samples = 0
    for k, batch in enumerate(source):
        feeds = {name: np.asarray(value) for name, value in batch.items() if name in feed_names}
        try:
            values = runner(feeds)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"onnxruntime failed on calibration batch {k}: {exc}") from None
        update(values)
        del values
        samples += batch_len(batch)
    if samples == 0:
        raise CalibrationError("the calibration source is empty: it yielded no batches")
    return samples


def activation_tensors(model: Model, types: Mapping[str, TensorInfo] | None = None) -> list[str]:
    """The default tensors to calibrate: float graph inputs and every float node output, in graph order.

    Left out: initializers, outputs of Constant nodes and of nodes computed from constants only,
    non-float tensors. Outputs whose type shape inference cannot tell are kept (checked at run time).
    """
    types = infer_types(model) if types is None else types
    g = model.graph
    inits = {t.name for t in g.initializer}
    constant = set(inits) - {i.name for i in g.input}
    names: list[str] = []
    for vi in g.input:
        if vi.name not in inits and _maybe_float(types.get(vi.name)):
            names.append(vi.name)
    for node in g.node:
        reads = node_reads(node)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx")) or (
            reads and all(r in constant for r in reads) and not any(True for _ in subgraphs(node))
        ):
            constant.update(o for o in node.output if o)
            continue
        names.extend(o for o in node.output if o and _maybe_float(types.get(o)))
    return list(dict.fromkeys(names))


def plan_groups(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Split ``names`` (in graph order) into consecutive groups whose bytes per batch fit ``budget``.

    A tensor larger than the budget on its own gets a group of its own (and a warning).
    """
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    oversize = []
    for name in names:
        size = sizes.get(name, 0)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        if size > budget:
            oversize.append(name)
        current.append(name)
        used += size
    if current:
        groups.append(current)
    if oversize:
        biggest = max(sizes[n] for n in oversize)
        log.warning("%d tensors (e.g. '%s') each need more than the memory budget of %.2f MiB per batch "
                    "(largest %.2f MiB); use smaller batches to stay within it",
                    len(oversize), oversize[0], budget / 2**20, biggest / 2**20)
    return groups or [[]]


# -- tensors and sizes ------------------------------------------------------------------------------


def _maybe_float(info: TensorInfo | None) -> bool:
    return info is None or info.elem_type == 0 or info.elem_type in FLOAT_TYPES


def _exposable(model: Model, requested: list[str]) -> list[str]:
    """The requested names that are tensors of the top-level graph (others: a warning each)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    known = {i.name for i in g.input if i.name not in inits}
    for node in g.node:
        known.update(o for o in node.output if o)
    missing = [n for n in requested if n not in known]
    for name in missing:
        log.warning("tensor '%s' is not an activation of the top-level graph (unknown, an initializer, or inside a "
                    "subgraph such as an If branch); it is left out of the calibration table", name)
    return [n for n in requested if n in known]


def _input_names(model: Model) -> set[str]:
    """Graph inputs the data may feed (those with an initializer default are optional)."""
    return {vi.name for vi in model.graph.input}


def _check_batch(batch: Mapping[str, np.ndarray], inputs: set[str], k: int) -> None:
    if not isinstance(batch, Mapping):
        raise CalibrationError(f"calibration batch {k} is a {type(batch).__name__}, not a mapping {{input name: array}}")
    unknown = sorted(set(batch) - set(inputs))
    if unknown:
        raise CalibrationError(f"calibration batch {k} has data for {unknown}, which the graph has no input for; "
                               f"its inputs are {sorted(inputs)}")


def _dtype_bytes(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def choose_batch(model: Model, first: Mapping[str, np.ndarray], tensors: Sequence[str], *, most: int = 8,
                 budget_bytes: int = 64 << 20, providers: Sequence = ("CPUExecutionProvider",)) -> tuple[int, dict]:
    """Samples per run (1..``most``) so that ``tensors`` of one run take at most ``budget_bytes``.

    ``first`` holds one sample. Sizes come from shape inference, and where it cannot tell, from
    running that sample exposing the tensors; that session is returned in the probe dict for
    :func:`calibrate` (``probe=``) to reuse, so the measurement costs no extra session.
    """
    types = infer_types(model)
    names = _exposable(model, list(dict.fromkeys(tensors)))
    probe: dict = {}
    probe["per_sample"] = sizes = _estimate_bytes(model, names, types, dict(first), providers, probe)
    return int(max(1, min(most, budget_bytes // max(sum(sizes.values()), 1)))), probe


def _estimate_bytes(model, names, types, first: Batch, providers, probe: dict | None = None) -> dict[str, int]:
    """Bytes each tensor takes for a batch like ``first``: from inferred shapes, else measured on one sample."""
    bind: dict[str, int] = {}
    for name, value in first.items():
        info = types.get(name)
        shape = np.shape(value)
        if info is not None and info.shape is not None and len(info.shape) == len(shape):
            for d, actual in zip(info.shape, shape):
                if isinstance(d, str):
                    bind.setdefault(d, int(actual))
    sizes: dict[str, int] = {}
    unknown: list[str] = []
    for name in names:
        info = types.get(name)
        dims = None if info is None or info.shape is None else [d if isinstance(d, int) else bind.get(d) for d in info.shape]
        if dims is None or any(d is None for d in dims) or not info.elem_type:
            unknown.append(name)
        else:
            sizes[name] = math.prod(dims) * _dtype_bytes(info.elem_type)
    if unknown:
        log.debug("measuring %d tensors whose size shape inference cannot tell", len(unknown))
        # measure everything in the probe: the same session can then serve a single-group pass
        sizes.update(_measure(model, list(names), types, first, providers, probe))
    return sizes


def _measure(model, names: list[str], types, first: Batch, providers, probe: dict | None = None,
             chunk: int = 16) -> dict[str, int]:
    """Bytes per batch of ``names``: run one sample (inputs with a dynamic first dim sliced) and scale;
    if the model refuses one sample, run the first batch exposing ``chunk`` tensors at a time.
    The one-sample session is left in ``probe`` (with the names it exposes) for calibrate to reuse."""
    declared = {vi.name: vi.type.tensor_type.shape.dim for vi in model.graph.input}
    dynamic = {k for k, dims in declared.items() if dims and not dims[0].HasField("dim_value")}
    n = batch_len(first)
    one = {k: (np.asarray(v)[:1] if k in dynamic and np.ndim(v) else v) for k, v in first.items()}
    if n == 1 or any(k in dynamic for k in first):  # one sample at hand: one session measures everything
        try:
            session = _session(model, names, types, providers)
            values = session.run(names, one)
            if probe is not None:
                probe.update(session=session, names=list(names))
            return {name: int(getattr(v, "nbytes", 0)) * n for name, v in zip(names, values)}
        except Exception as exc:  # noqa: BLE001 - e.g. a Reshape to a fixed size: measure on the whole batch
            log.debug("one-sample size probe failed (%s); measuring on the first batch", exc)
    sizes = {}
    for i in range(0, len(names), chunk):
        part = names[i : i + chunk]
        try:
            values = _session(model, part, types, providers).run(part, dict(first))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationError(f"onnxruntime failed on calibration batch 0: {exc}") from None
        sizes.update({name: int(getattr(v, "nbytes", 0)) for name, v in zip(part, values)})
        del values
    return sizes


# -- onnxruntime ------------------------------------------------------------------------------------


def _pruned_proto(model: Model, outputs: Sequence[str], types: Mapping[str, TensorInfo]) -> onnx.ModelProto:
    """A model whose graph outputs are ``outputs``, keeping only the nodes and initializers they need."""
    src = model.graph
    producer = {o: i for i, n in enumerate(src.node) for o in n.output if o}
    keep: set[int] = set()
    needed: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        i = producer.get(name)
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(node_reads(src.node[i]))
    proto = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(proto, field, getattr(model.proto, field))
    proto.opset_import.extend(model.proto.opset_import)
    proto.functions.extend(model.proto.functions)
    g = proto.graph
    g.name = src.name
    inits = {t.name for t in src.initializer}
    g.input.extend(i for i in src.input if i.name not in inits or i.name in needed)
    g.initializer.extend(t for t in src.initializer if t.name in needed)
    g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in needed)
    g.node.extend(src.node[i] for i in sorted(keep))
    g.value_info.extend(v for v in src.value_info if v.name in needed)
    for name in outputs:
        info = types.get(name)
        if info is not None and info.elem_type:
            g.output.append(onnx.helper.make_tensor_value_info(name, info.elem_type, None))
        else:
            g.output.append(onnx.ValueInfoProto(name=name))
    return proto


def _session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVEL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _session(model: Model, outputs: Sequence[str], types, providers) -> ort.InferenceSession:
    proto = _pruned_proto(model, outputs, types)
    opts = _session_options()
    try:
        if model.uses_external_data() and model.base_dir is not None:
            # read external data in place, relative to the model's own folder
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.base_dir))
        return session_from_proto(proto, opts, providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        if model.uses_external_data():
            return _session_from_folder(model, proto, providers)
        raise CalibrationError(f"onnxruntime cannot load the model exposing the calibration tensors: {exc}") from None


def _session_from_folder(model: Model, proto: onnx.ModelProto, providers) -> ort.InferenceSession:
    """Fallback for external data: save a copy in a temporary folder (as ogt.testing does) and load that."""
    from ..graph.io import save

    with tempfile.TemporaryDirectory(prefix="ogt-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(Model(proto, model.base_dir, None), path, external_data=True)
        try:
            return ort.InferenceSession(str(path), _session_options(), providers=list(providers))
        except Exception as exc:  # noqa: BLE001
            raise CalibrationError(f"onnxruntime cannot load the model exposing the calibration tensors: {exc}") from None


def _run_pass(session, names: list[str], batches: Iterator[tuple[int, Batch]], observers, inputs, bar, taps) -> int:
    """Run every batch, fold each output into its observer and drop it at once. Returns the sample count."""
    samples = 0
    feed_names = {i.name for i in session.get_inputs()}
    for k, batch in batches:
        _check_batch(batch, inputs, k)
        feeds = {name: value for name, value in batch.items() if name in feed_names}
        try:
            values = session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationError(f"onnxruntime failed on calibration batch {k}: {exc}") from None
        for j, name in enumerate(names):
            value, values[j] = values[j], None
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                observers[name].update(value)
                if name in taps:  # a tap with ``wants_batch`` also gets the batch (an attention mask, say)
                    tap = taps[name]
                    tap(value, batch) if getattr(tap, "wants_batch", False) else tap(value)
            del value
        del values
        n = batch_len(batch)
        samples += n
        bar.update(n)
    return samples


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool, total: int | None):
    """A tqdm bar over samples (shown on a terminal only), or nothing when disabled."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, unit="sample", desc="calibrating", disable=None, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


# -- the source ---------------------------------------------------------------------------------------


class _Reader:
    """Reads a source once per pass; a one-shot source needing several passes is spilled to disk."""

    def __init__(self, source: Iterable[Mapping[str, np.ndarray]]):
        self.source = source
        self._it: Iterator | None = None
        self._first: Batch | None = None
        self._spilled: list[list[tuple[str, Path]]] | None = None
        self._spill_dir: Path | None = None

    @property
    def reiterable(self) -> bool:
        flag = getattr(self.source, "reiterable", None)
        if flag is not None:
            return bool(flag)
        return isinstance(self.source, Sequence) or iter(self.source) is not self.source

    @property
    def num_samples(self) -> int | None:
        n = getattr(self.source, "num_samples", None)
        if n is None and isinstance(self.source, Sequence):
            with contextlib.suppress(Exception):
                n = sum(batch_len(b) for b in self.source)
        return None if n is None else int(n)

    def first(self) -> Batch | None:
        """The first batch; the first pass starts with it without reading it twice."""
        try:
            self._it = iter(self.source)
        except TypeError:
            raise CalibrationError(f"the calibration source ({type(self.source).__name__}) is not iterable") from None
        batch = next(self._it, None)
        if batch is not None and isinstance(batch, Mapping):
            batch = dict(batch)
        self._first = batch
        return batch

    def batches(self, g: int, *, spill: bool, stack: contextlib.ExitStack) -> Iterator[tuple[int, Batch]]:
        if g == 0:
            return self._first_pass(spill and not self.reiterable, stack)
        if self._spilled is not None:
            return self._read_spill()
        return self._fresh()

    def _first_pass(self, spill: bool, stack: contextlib.ExitStack) -> Iterator[tuple[int, Batch]]:
        if spill:
            self._spill_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ogt-calib-spill-")))
            self._spilled = []
            log.info("spilling the one-shot calibration source to %s for the later passes", self._spill_dir)
        it, first = self._it, self._first
        self._it = self._first = None
        for k, batch in enumerate(_chain(first, it)):
            batch = dict(batch) if isinstance(batch, Mapping) else batch
            if self._spilled is not None and isinstance(batch, Mapping):
                self._spill(k, batch)
            yield k, batch

    def _spill(self, k: int, batch: Batch) -> None:
        files = []
        for j, (name, value) in enumerate(batch.items()):
            path = self._spill_dir / f"b{k:07d}_{j}.npy"
            np.save(path, np.asarray(value), allow_pickle=False)
            files.append((name, path))
        self._spilled.append(files)

    def _read_spill(self) -> Iterator[tuple[int, Batch]]:
        for k, files in enumerate(self._spilled):
            yield k, {name: np.load(path, allow_pickle=False) for name, path in files}

    def _fresh(self) -> Iterator[tuple[int, Batch]]:
        for k, batch in enumerate(self.source):
            yield k, dict(batch) if isinstance(batch, Mapping) else batch


def _chain(first, it) -> Iterator:
    if first is not None:
        yield first
    yield from it


# -- the table ----------------------------------------------------------------------------------------


def _table(model: Model, method: str, samples: int, scheme: QScheme, template: Observer,
           observers: Mapping[str, Observer]) -> CalibrationTable:
    ranges: dict[str, TensorRange] = {}
    for name, obs in observers.items():
        st = obs.stats()
        if st.nonfinite:
            log.warning("tensor '%s': %d non-finite values (inf/NaN) were ignored", name, st.nonfinite)
        if not obs.observed:
            log.warning("tensor '%s' produced no finite float values during calibration; it is left out of the table", name)
            continue
        lo, hi = obs.clip_range(scheme)
        ranges[name] = TensorRange(name, float(lo), float(hi), float(st.min), float(st.max), samples)
    options = json.loads(json.dumps({"scheme": dataclasses.asdict(scheme), "observer": template.config()}))
    return CalibrationTable(graph_fingerprint(model), method, samples, ranges, options)
