"""The child-process side of ``quantize_compare.py``: prepare data, quantize with a peer, evaluate.

Each function runs in its own process, started by the harness, so that what it allocates is
measured (or kept away from the measurements) on its own. Nothing here prints results: children
write JSON / npz files that the harness reads back.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # models/ lives beside the package

WEIGHT_MIN_ELEMENTS = 1024  # smaller float tensors (biases, scales) are not counted as weights
WEIGHTED_OPS = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,)}
LATENCY_BATCHES = (1, 8)
LATENCY_MIN_SECONDS = 1.0
LATENCY_MAX_RUNS = 5000
LATENCY_BLOCK = 5
EVAL_BATCH = 8


@dataclass(frozen=True)
class Subject:
    """A model recipe, its data recipe, and what fidelity is measured on."""

    name: str
    recipe: str  # function in models.recipes returning the float model's path
    data: str  # function in models.recipes returning a DataSplit
    output: str  # the graph output fidelity is measured on
    kind: str  # "classifier" or "embedding"
    n_eval: int


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("mobilenet_v2", "mobilenet_v2", "imagenet_crops", "logits", "classifier", 256),
        Subject("minilm_l3", "minilm_l3", "sentences", "461", "embedding", 256),
        Subject("digits_cnn", "digits_cnn", "digits_data", "logits", "classifier", 360),
    )
}


# --------------------------------------------------------------------------- calibration data


class NpzSamples(Sequence):
    """Batches of rows of an uncompressed ``.npz``, read on demand (never the whole array).

    Each item is ``{input_name: array[batch, ...]}``; the last batch may be smaller. Both peers
    get their calibration data through this, so their peak RSS is not the data set's size.
    """

    def __init__(self, path: Path, batch: int = 1) -> None:
        self.path, self.batch = Path(path), batch
        self._members: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        with zipfile.ZipFile(self.path) as zf:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{path}: {info.filename} is compressed; write it with np.savez")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    if fortran:
                        raise ValueError(f"{path}: {info.filename} is Fortran-ordered")
                    self._members[info.filename.removesuffix(".npy")] = (info.filename, dtype, shape, f.tell())
        rows = {shape[0] for _, _, shape, _ in self._members.values()}
        if len(rows) != 1:
            raise ValueError(f"{path}: inputs disagree on the number of samples: {rows}")
        self.samples = rows.pop()
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return (self.samples + self.batch - 1) // self.batch

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = index * self.batch
        stop = min(start + self.batch, self.samples)
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        out = {}
        for name, (member, dtype, shape, offset) in self._members.items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            with self._zip.open(member) as f:
                f.seek(offset + start * row)
                data = f.read((stop - start) * row)
            out[name] = np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:])).copy()
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


def _sample_digests(arrays: dict[str, np.ndarray]) -> list[str]:
    n = next(iter(arrays.values())).shape[0]
    names = sorted(arrays)
    return [hashlib.sha256(b"".join(arrays[k][i].tobytes() for k in names)).hexdigest() for i in range(n)]


def child_prepare(subject: Subject, work: Path, calib_sizes: Sequence[int], n_eval: int) -> None:
    """Build the float model and write ``calib_<n>.npz`` (nested), ``eval.npz`` and ``prepare.json``."""
    from models import recipes

    start = time.perf_counter()
    model = getattr(recipes, subject.recipe)()
    build_s = time.perf_counter() - start
    split = getattr(recipes, subject.data)(n_calib=max(calib_sizes), n_eval=n_eval)
    calib_digests, eval_digests = _sample_digests(split.calib), _sample_digests(split.eval)
    overlap = len(set(calib_digests) & set(eval_digests)) + len(set(split.calib_ids) & set(split.eval_ids))
    if overlap:
        raise RuntimeError(f"{subject.name}: {overlap} calibration samples also in the evaluation set")
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in sorted(set(calib_sizes)):
        path = work / f"calib_{n}.npz"
        np.savez(path, **{k: v[:n] for k, v in split.calib.items()})
        files[n] = str(path)
    np.savez(work / "eval.npz", **split.eval)
    if split.eval_labels is not None:
        np.save(work / "eval_labels.npy", split.eval_labels)
    info = {
        "model": str(model),
        "model_bytes": Path(model).stat().st_size,
        "model_build_s": build_s,
        "data": subject.data,
        "inputs": {k: {"dtype": str(v.dtype), "sample_shape": list(v.shape[1:])} for k, v in split.calib.items()},
        "calib_files": files,
        "calib_bytes": {n: Path(p).stat().st_size for n, p in files.items()},
        "n_eval": len(split.eval_ids),
        "calib_eval_overlap": overlap,
        "calib_ids_head": list(split.calib_ids[:5]),
        "eval_ids_head": list(split.eval_ids[:5]),
        "labels": split.eval_labels is not None,
    }
    (work / "prepare.json").write_text(json.dumps(info, indent=2))


# --------------------------------------------------------------------------- peers


ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# quant_pre_process's symbolic shape inference stops on paraphrase-MiniLM ("Incomplete symbolic
# shape inference"); auto_merge=True (the documented remedy) gets through.
ORT_PRE_PROCESS_ATTEMPTS: tuple[dict[str, bool], ...] = ({}, {"auto_merge": True}, {"skip_symbolic_shape": True})


def npz_reader(calib: Path, batch: int):
    """An onnxruntime CalibrationDataReader over a calibration .npz (what users of quantize_static write)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = NpzSamples(calib, batch)
            self.iter = iter(self.samples)

        def get_next(self):
            return next(self.iter, None)

        def __len__(self) -> int:
            return len(self.samples)

    return Reader()


def ort_pre_process(model: Path, pre: Path) -> list[dict]:
    """quant_pre_process with defaults, then the option sets a user tries when it fails; returns the
    attempts (``options``, ``error`` = "Type: message" or None, ``message`` = the bare message)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = []
    for options in ORT_PRE_PROCESS_ATTEMPTS:  # what a user does when the default fails
        try:
            quant_pre_process(str(model), str(pre), **options)
        except Exception as exc:  # noqa: BLE001 - recorded, then the next option set is tried
            attempts.append({"options": options, "error": f"{type(exc).__name__}: {exc}", "message": str(exc)})
            continue
        attempts.append({"options": options, "error": None, "message": None})
        return attempts
    raise RuntimeError(f"quant_pre_process failed with every option set: {attempts}")


def child_quantize_ort(model: Path, out: Path, calib: Path, method: str, variant: str, batch: int,
                       report: Path) -> None:
    """quant_pre_process, then quantize_static (QDQ, per-channel int8 weights).

    ``variant`` ``u8``: uint8 activations (asymmetric); ``s8``: int8 activations with
    ``ActivationSymmetric=True``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = out.with_name(out.stem + ".preprocessed.onnx")
    t0 = time.perf_counter()
    attempts = ort_pre_process(model, pre)
    t1 = time.perf_counter()
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if variant == "s8" else {}
    quantize_static(
        str(pre),
        str(out),
        npz_reader(calib, batch),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if variant == "s8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        extra_options=extra,
    )
    t2 = time.perf_counter()
    pre.unlink(missing_ok=True)
    notes = [f"quant_pre_process({a['options'] or 'defaults'}) failed: {a['error']}" for a in attempts if a["error"]]
    report.write_text(json.dumps({"pre_process_s": t1 - t0, "quantize_s": t2 - t1, "pre_process_attempts": attempts,
                                  "notes": notes}))


def child_quantize_onnxsim(model: Path, out: Path, calib: Path, method: str, batch: int, prep: str,
                           report: Path) -> None:
    """onnxsim.quantize_static (its default scheme: QDQ on Conv/MatMul/Gemm inputs, uint8 activations).

    ``prep`` ``simplify``: run ``onnxsim.simplify`` first (shape inference, BN fusion), as
    onnxruntime's contenders run ``quant_pre_process``. ``raw``: hand the model over as it is;
    onnxsim then only quantizes ops whose input dtype it can see (graph inputs, value_info).
    """
    import onnx
    import onnxsim

    t0 = time.perf_counter()
    if prep == "simplify":
        source, ok = onnxsim.simplify(str(model))
        if not ok:
            raise RuntimeError("onnxsim.simplify: the simplified model failed its check")
    else:
        source = str(model)
    t1 = time.perf_counter()
    quantized = onnxsim.quantize_static(source, calibration_data=NpzSamples(calib, batch), method=method)
    t2 = time.perf_counter()
    onnx.save(quantized, str(out))
    report.write_text(json.dumps({"pre_process_s": t1 - t0, "quantize_s": t2 - t1, "save_s": time.perf_counter() - t2}))


# --------------------------------------------------------------------------- evaluation


def _session(path: Path):  # -> onnxruntime.InferenceSession
    """Default options (what users deploy) except that idle intra-op threads do not spin.

    Latency is timed with several sessions alternating in one process. With spinning on, the
    worker threads of the session that just ran keep spinning on this 2-core machine while the
    next one runs, and whichever model follows which decides the numbers (MiniLM W8A8 at batch
    8: 13 ms alone in its process, 23-38 ms when alternated with other spinning sessions). With
    spinning off, alternated timing agrees in ranking and ratio with one-session-per-process runs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def child_reference(subject: Subject, model: Path, eval_npz: Path, ref_npz: Path) -> None:
    """The float model's ``subject.output`` on the evaluation set."""
    np.savez(ref_npz, y=_run_output(_session(model), subject.output, dict(np.load(eval_npz))))


def _run_output(session, output: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    n = next(iter(inputs.values())).shape[0]
    parts = [session.run([output], {k: v[i : i + EVAL_BATCH] for k, v in inputs.items()})[0]
             for i in range(0, n, EVAL_BATCH)]
    return np.concatenate(parts)


def fidelity(kind: str, y: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Classifier: top-1 agreement with float, logit SQNR (dB), accuracy; embedding: cosine, SQNR."""
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    noise = float(np.sum((y - ref) ** 2))
    out = {"sqnr_db": None if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)}  # None: identical
    if kind == "classifier":
        out["top1_agreement"] = float(np.mean(np.argmax(y, 1) == np.argmax(ref, 1)))
        if labels is not None:
            out["accuracy"] = float(np.mean(np.argmax(y, 1) == labels))
            out["float_accuracy"] = float(np.mean(np.argmax(ref, 1) == labels))
    else:
        cos = np.sum(y * ref, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
        out.update(cos_mean=float(np.mean(cos)), cos_min=float(np.min(cos)))
    return out


def _summary(times: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(times)
    return {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)), "runs": len(times)}


def latency_ms(sessions: dict[str, object], inputs: dict[str, np.ndarray], batch: int, runs: int, warmup: int,
               min_seconds: float = LATENCY_MIN_SECONDS) -> dict[str, dict[str, float]]:
    """Wall time (ms) of ``session.run`` on the first ``batch`` samples, per named session.

    The sessions are timed in alternating blocks of LATENCY_BLOCK runs (order flipped every
    block), so that a slow spell of this shared machine hits all of them alike and their ratio
    holds even when the absolute numbers drift. Each gets at least ``runs`` timed runs after
    ``warmup`` untimed ones, and more, up to LATENCY_MAX_RUNS, until ``min_seconds`` of its own
    runs have been timed.
    """
    feed = {k: np.ascontiguousarray(v[:batch]) for k, v in inputs.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)

    def wanted(t: list[float]) -> bool:
        return len(t) < runs or (sum(t) < min_seconds and len(t) < LATENCY_MAX_RUNS)

    order = list(sessions)
    while any(wanted(t) for t in times.values()):
        for name in order:
            for _ in range(LATENCY_BLOCK):
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
        order.reverse()
    return {name: _summary(t) for name, t in times.items()}


def _tensor_bytes(t) -> int:  # onnx.TensorProto -> bytes on disk
    from onnx import TensorProto, helper

    if t.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64))
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def analyse_model(path: Path) -> dict[str, object]:
    """Size on disk, Q/DQ counts, and where float weights (tensors >= 1024 elements) remain.

    ``float_weight_bytes``: all float initializers / Constant tensors with at least
    WEIGHT_MIN_ELEMENTS elements. Broken down into ``float_unused_bytes`` (consumed by no node),
    ``float_behind_quantize_bytes`` (stored in float and quantized by a QuantizeLinear at run
    time) and ``float_in_float_ops_bytes`` (weights of Conv/MatMul/Gemm/Gather left in float).
    """
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    consumers: dict[str, list] = collections.defaultdict(list)

    def walk(g) -> Iterator:
        for node in g.node:
            yield node
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    yield from walk(sub)

    nodes = list(walk(graph))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name:
                consumers[name].append((node, i))
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], a.t) for n in nodes if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    data_files = {e.value for t in graph.initializer if t.data_location == TensorProto.EXTERNAL
                  for e in t.external_data if e.key == "location"}
    stats = collections.Counter()
    for name, t in tensors:
        size = _tensor_bytes(t)
        is_float = t.data_type in float_types
        stats["float_bytes" if is_float else "int_bytes"] += size
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4):
            stats["int8_weight_bytes"] += size
        if not is_float or int(np.prod(t.dims, dtype=np.int64)) < WEIGHT_MIN_ELEMENTS:
            continue
        stats["float_weight_bytes"] += size
        uses = consumers.get(name, [])
        if not uses:
            stats["float_unused_bytes"] += size
        elif any(node.op_type == "QuantizeLinear" and i == 0 for node, i in uses):
            stats["float_behind_quantize_bytes"] += size
        elif any(i in WEIGHTED_OPS.get(node.op_type, ()) for node, i in uses):
            stats["float_in_float_ops_bytes"] += size
    ops = collections.Counter(n.op_type for n in nodes)
    return {
        "file_bytes": path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files
                                                if (path.parent / f).is_file()),
        "external_data_files": sorted(data_files),
        "nodes": len(nodes),
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "qlinear_ops": sum(v for k, v in ops.items() if k.startswith("QLinear")),
        "batchnorm": ops["BatchNormalization"],
        "metadata_bytes": sum(len(p.key) + len(p.value) for p in model.metadata_props),
        "functions": len(model.functions),
        **{k: stats[k] for k in ("float_bytes", "int_bytes", "int8_weight_bytes", "float_weight_bytes",
                                 "float_unused_bytes", "float_behind_quantize_bytes", "float_in_float_ops_bytes")},
    }


def child_evaluate(subject: Subject, model: Path, eval_npz: Path, ref_npz: Path, labels_npy: Path | None,
                   out_json: Path, runs: int, warmup: int, float_model: Path | None = None,
                   min_seconds: float = LATENCY_MIN_SECONDS) -> None:
    """Fidelity on the evaluation set, CPU latency at batch 1 and 8, and the file's contents.

    With ``float_model``, latency is timed against it in the same process, interleaved (see
    :func:`latency_ms`), and ``latency_vs_float`` holds the ratio of medians.
    """
    result: dict[str, object] = {"model": analyse_model(model)}
    inputs = dict(np.load(eval_npz))
    labels = np.load(labels_npy) if labels_npy is not None else None
    start = time.perf_counter()
    session = _session(model)
    result["session_s"] = time.perf_counter() - start
    y = _run_output(session, subject.output, inputs)
    result["fidelity"] = fidelity(subject.kind, y, np.load(ref_npz)["y"], labels)
    sessions = {"model": session}
    if float_model is not None:
        sessions["float"] = _session(float_model)
    result["latency"] = {str(b): latency_ms(sessions, inputs, b, runs, warmup, min_seconds) for b in LATENCY_BATCHES}
    result["latency_ms"] = {b: v["model"]["median"] for b, v in result["latency"].items()}
    if float_model is not None:
        result["latency_vs_float"] = {b: v["model"]["median"] / v["float"]["median"]
                                      for b, v in result["latency"].items()}
    out_json.write_text(json.dumps(result))


def child_latency(models: dict[str, Path], eval_npz: Path, out_json: Path, runs: int, warmup: int,
                  min_seconds: float = LATENCY_MIN_SECONDS) -> None:
    """Several models timed against each other in one process (see :func:`latency_ms`)."""
    inputs = dict(np.load(eval_npz))
    sessions = {name: _session(path) for name, path in models.items()}
    out_json.write_text(json.dumps({str(b): latency_ms(sessions, inputs, b, runs, warmup, min_seconds)
                                    for b in LATENCY_BATCHES}))
