"""BatchNorm folding on a large (> 2 GB, external data) Conv/BN stack: ogt vs onnxslim vs onnxsim.

The model is a chain of ``Conv(1x1) -> BatchNormalization -> Relu`` blocks (fp32, every other
Conv has a bias) on an input of shape ``[1, C, 4, 4]``, so running it is cheap while its weights
are large. It is written tensor by tensor into one external-data file beside the ``.onnx`` and
cached under ``benchmarks/work/``: the generator never holds more than one block's weights in memory.

Every contender runs in its own subprocess, one after the other, on the same input file. For
each the harness records wall time and the child's own peak RSS (``ru_maxrss`` of that process,
read by GNU time, or by ``os.wait4`` here when GNU time is missing), then checks the output in
another subprocess: BatchNormalization nodes left, and equivalence with the original in
onnxruntime (CPU, graph optimizations disabled) on one fixed random input.

    python benchmarks/bn_fold_large.py --gb 2.5                      # the real run
    python benchmarks/bn_fold_large.py --gb 0.05 --channels 512      # smoke run

Results: a Markdown table on stdout and ``benchmarks/work/bn_fold_large.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from _harness import Measurement, run_measured  # shared process measurement (GNU time / wait4)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORK_DIR = BENCH_DIR / "work"
GB = 10**9
ALIGN = 4096  # external-data offsets are page aligned, so runtimes may mmap them
OPSET = 17
IR_VERSION = 8
RTOL = 1e-4
ATOL_FRACTION = 1e-4  # atol = ATOL_FRACTION * max|reference|
CHILD = "_child"  # argv[1] marker of the harness's own helper subprocesses


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class StackSpec:
    """What to generate: roughly ``gb`` * 1e9 bytes of fp32 weights in Conv/BN blocks."""

    gb: float
    channels: int = 4096
    spatial: int = 4
    seed: int = 0

    @property
    def block_bytes(self) -> int:
        c = self.channels
        return 4 * (c * c + 4 * c) + 2 * c  # W + 4 BN vectors + bias on every other block

    @property
    def blocks(self) -> int:
        return max(2, round(self.gb * GB / self.block_bytes))

    @property
    def stem(self) -> str:
        return f"bn_stack_{self.gb:g}gb_c{self.channels}_s{self.seed}"


@dataclass(frozen=True)
class Block:
    weight: np.ndarray
    bias: np.ndarray | None
    scale: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def make_block(rng: np.random.Generator, channels: int, with_bias: bool) -> Block:
    """One Conv/BN block's parameters; He-scaled so activations stay O(1) down the stack."""
    c = channels
    weight = rng.standard_normal((c, c, 1, 1), dtype=np.float32)
    weight *= np.float32(np.sqrt(2.0 / c))
    vec = (c,)
    return Block(
        weight=weight,
        bias=(0.1 * rng.standard_normal(vec, dtype=np.float32)) if with_bias else None,
        scale=rng.uniform(0.5, 1.5, vec).astype(np.float32),
        beta=(0.1 * rng.standard_normal(vec, dtype=np.float32)),
        mean=(0.1 * rng.standard_normal(vec, dtype=np.float32)),
        var=rng.uniform(0.5, 2.0, vec).astype(np.float32),
    )


class ExternalDataWriter:
    """Appends arrays to one data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path) -> None:
        self._file = data_path.open("wb")
        self._location = data_path.name
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        pad = -self._file.tell() % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
        offset = self._file.tell()
        data = np.ascontiguousarray(array, dtype="<f4")
        self._file.write(data.tobytes())  # one tensor at a time: the copy is bounded
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._location), ("offset", offset), ("length", data.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.nbytes += data.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()


def block_nodes(i: int, x: str, has_bias: bool) -> tuple[list[onnx.NodeProto], str]:
    p = f"b{i}"
    conv_inputs = [x, f"{p}.w"] + ([f"{p}.b"] if has_bias else [])
    nodes = [
        helper.make_node("Conv", conv_inputs, [f"{p}.conv"], name=f"{p}.conv", kernel_shape=[1, 1]),
        helper.make_node(
            "BatchNormalization",
            [f"{p}.conv", f"{p}.scale", f"{p}.beta", f"{p}.mean", f"{p}.var"],
            [f"{p}.bn"],
            name=f"{p}.bn",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", [f"{p}.bn"], [f"{p}.relu"], name=f"{p}.relu"),
    ]
    return nodes, f"{p}.relu"


def block_initializers(writer: ExternalDataWriter, i: int, block: Block) -> list[TensorProto]:
    """Write one block's tensors to the data file, named as ``block_nodes`` expects."""
    p = f"b{i}"
    named = [(f"{p}.w", block.weight)] + ([(f"{p}.b", block.bias)] if block.bias is not None else [])
    named += [(f"{p}.scale", block.scale), (f"{p}.beta", block.beta), (f"{p}.mean", block.mean),
              (f"{p}.var", block.var)]
    return [writer.add(name, array) for name, array in named]


def write_stack(spec: StackSpec, model_path: Path) -> None:
    """Write the model and its data file, one block's tensors in memory at a time."""
    data_path = model_path.with_name(model_path.name + ".data")
    rng = np.random.default_rng(spec.seed)
    writer = ExternalDataWriter(data_path)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = "x"
    try:
        for i in range(spec.blocks):
            block = make_block(rng, spec.channels, with_bias=i % 2 == 0)
            inits += block_initializers(writer, i, block)
            new_nodes, x = block_nodes(i, x, block.bias is not None)
            nodes += new_nodes
    finally:
        writer.close()
    shape = [1, spec.channels, spec.spatial, spec.spatial]
    graph = helper.make_graph(
        nodes,
        "bn_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ogt-bench")
    model.ir_version = IR_VERSION
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(tmp))  # by path: checks the external-data references too
    tmp.replace(model_path)  # the .onnx appears last: its presence marks a complete cache entry


def external_weight_bytes(model_path: Path) -> int:
    """Bytes of initializer data (external lengths, plus any inline raw data)."""
    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def ensure_stack(spec: StackSpec, work_dir: Path) -> tuple[Path, float | None]:
    """The cached model's path, generating it if missing; and the generation time, if generated."""
    model_path = work_dir / f"{spec.stem}.onnx"
    if model_path.exists() and model_path.with_name(model_path.name + ".data").exists():
        return model_path, None
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_stack(spec, model_path)
    return model_path, time.perf_counter() - start


# --------------------------------------------------------------------------- measuring a child


GNU_TIME = Path("/usr/bin/time")
TIME_FORMAT = "%M %U %S"  # peak RSS KiB, user s, sys s


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read the input once so every contender starts with the same (warm) page cache."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    name: str
    tool: str  # what it runs, for the report
    argv: tuple[str, ...]  # with {IN} and {OUT} placeholders

    def command(self, in_path: Path, out_path: Path) -> list[str]:
        return [a.replace("{IN}", str(in_path)).replace("{OUT}", str(out_path)) for a in self.argv]


ONNXSIM_SNIPPET = (
    "import sys, onnxsim; "
    "_, ok = onnxsim.simplify(sys.argv[1], output_path=sys.argv[2], certify=False); "
    "sys.exit(0 if ok else 3)"
)


def contenders(bin_dir: Path, python: str) -> dict[str, Contender]:
    ogt = str(bin_dir / "ogt")
    return {
        c.name: c
        for c in (
            Contender(
                "ogt",
                "ogt transform -t fold-batchnorm -t cleanup",
                (ogt, "transform", "{IN}", "-o", "{OUT}", "-t", "fold-batchnorm", "-t", "cleanup"),
            ),
            Contender("onnxslim", "onnxslim CLI (default slim)", (str(bin_dir / "onnxslim"), "{IN}", "{OUT}")),
            Contender(
                "onnxsim",
                "onnxsim.simplify(path, output_path=...) (default passes)",
                (python, "-c", ONNXSIM_SNIPPET, "{IN}", "{OUT}"),
            ),
            Contender("onnxsim-cli", "onnxsim CLI (default passes)", (str(bin_dir / "onnxsim"), "{IN}", "{OUT}")),
        )
    }


def ogt_available(bin_dir: Path) -> bool:
    exe = bin_dir / "ogt"
    if not exe.exists():
        return False
    probe = subprocess.run([str(exe), "transform", "--help"], check=False, capture_output=True, timeout=120)
    return probe.returncode == 0


# --------------------------------------------------------------------------- verification (child side)


def session(path: Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def child_reference(model: Path, input_npz: Path, ref_npz: Path, seed: int) -> None:
    """Draw the fixed input and store the original model's output."""
    proto = onnx.load(str(model), load_external_data=False)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed + 1).standard_normal(dims, dtype=np.float32)
    np.savez(input_npz, x=x)
    np.savez(ref_npz, y=run_model(model, x))


@dataclass(frozen=True)
class Verification:
    """What the verify child found in one contender's output."""

    nodes: int | None = None
    batchnorm_nodes: int | None = None
    conv_nodes: int | None = None
    weight_bytes: int | None = None
    equivalent: bool | None = None
    max_abs_diff: float | None = None
    max_abs_ref: float | None = None
    atol: float | None = None
    error: str | None = None


def child_verify(candidate: Path, input_npz: Path, ref_npz: Path, out_json: Path) -> None:
    proto = onnx.load(str(candidate), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    graph = Verification(
        nodes=len(ops),
        batchnorm_nodes=ops.count("BatchNormalization"),
        conv_nodes=ops.count("Conv"),
        weight_bytes=external_weight_bytes(candidate),
    )
    ref = np.load(ref_npz)["y"]
    try:
        y = run_model(candidate, np.load(input_npz)["x"])
    except Exception as exc:  # noqa: BLE001 - a broken output is a result, not a harness failure
        found = replace(graph, equivalent=False, error=f"{type(exc).__name__}: {exc}")
    else:
        atol = ATOL_FRACTION * float(np.max(np.abs(ref)))
        same_shape = y.shape == ref.shape
        found = replace(
            graph,
            equivalent=bool(same_shape and np.allclose(y, ref, rtol=RTOL, atol=atol)),
            max_abs_diff=float(np.max(np.abs(y - ref))) if same_shape else None,
            max_abs_ref=float(np.max(np.abs(ref))),
            atol=atol,
        )
    out_json.write_text(json.dumps(asdict(found)))


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="bn_fold_large.py _child")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("model", type=Path)
    ref.add_argument("input_npz", type=Path)
    ref.add_argument("ref_npz", type=Path)
    ref.add_argument("--seed", type=int, default=0)
    ver = sub.add_parser("verify")
    ver.add_argument("candidate", type=Path)
    ver.add_argument("input_npz", type=Path)
    ver.add_argument("ref_npz", type=Path)
    ver.add_argument("out_json", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "reference":
        child_reference(args.model, args.input_npz, args.ref_npz, args.seed)
    else:
        child_verify(args.candidate, args.input_npz, args.ref_npz, args.out_json)
    return 0


def run_child(args: Sequence[str], cwd: Path, log_path: Path) -> Measurement:
    return run_measured([sys.executable, str(Path(__file__).resolve()), CHILD, *args], cwd, log_path, 3600)


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Result:
    name: str
    tool: str
    command: list[str]
    status: str
    measurement: Measurement | None = None
    rss_over_weights: float | None = None
    output_bytes: int | None = None
    verify: Verification = field(default_factory=Verification)
    error_tail: str | None = None


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


HARNESS_FILES = frozenset({"run.log", "run.time", "verify.json", "verify.log", "verify.time"})


def output_files(out_dir: Path) -> list[Path]:
    """What the contender wrote into its (otherwise empty) output directory."""
    return sorted(p for p in out_dir.iterdir() if p.is_file() and p.name not in HARNESS_FILES)


def bench_one(contender: Contender, model: Path, weight_bytes: int, ref: tuple[Path, Path], work: Path,
              timeout_s: float, keep: bool) -> Result:
    out_dir = work / "out" / contender.name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    out_path = out_dir / f"{contender.name}.onnx"
    cmd = contender.command(model, out_path)
    log = out_dir / "run.log"
    m = run_measured(cmd, out_dir, log, timeout_s)  # cwd = out_dir: tools that write "<name>.data" to cwd stay put
    result = Result(contender.name, contender.tool, cmd, "ok", m, m.peak_rss_bytes / weight_bytes)
    if m.timed_out or m.returncode != 0 or not out_path.exists():
        result.status = "timeout" if m.timed_out else (f"failed (rc={m.returncode})" if m.returncode else "no output")
        result.error_tail = tail(log)
    else:
        result.output_bytes = sum(p.stat().st_size for p in output_files(out_dir))
        verify_json = out_dir / "verify.json"
        vm = run_child(["verify", str(out_path), str(ref[0]), str(ref[1]), str(verify_json)], out_dir,
                       out_dir / "verify.log")
        if vm.returncode == 0:
            result.verify = Verification(**json.loads(verify_json.read_text()))
        else:
            result.verify = Verification(error=tail(out_dir / "verify.log"))
    if not keep:
        for p in output_files(out_dir):
            p.unlink()
    return result


def machine_info() -> dict[str, object]:
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions: dict[str, str | None] = {}
    for pkg in ("ogt", "onnx", "onnxruntime", "numpy", "onnxslim", "onnxsim"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gb": round(mem_kib * 1024 / GB, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(r: Result, base: Measurement | None) -> str:
    m, v = r.measurement, r.verify
    eq = "-" if v.equivalent is None else f"{'yes' if v.equivalent else 'NO'} ({fmt(v.max_abs_diff, '.2e')})"
    cells = [
        r.name,
        r.status,
        fmt(m.wall_s if m else None, ".1f"),
        fmt(m.peak_rss_bytes / GB if m else None, ".2f"),
        fmt(r.rss_over_weights, ".2f"),
        fmt(m.wall_s / base.wall_s if m and base else None, ".2f"),
        fmt(m.peak_rss_bytes / base.peak_rss_bytes if m and base else None, ".2f"),
        "-" if v.batchnorm_nodes is None else str(v.batchnorm_nodes),
        eq,
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(results: Sequence[Result], weight_bytes: int) -> str:
    base = next((r.measurement for r in results if r.name == "ogt" and r.status == "ok"), None)
    header = ("contender", "status", "wall s", "peak RSS GB", "RSS / weights", "time vs ogt", "RSS vs ogt",
              "BN left", "equivalent (max abs diff)")
    rows = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    rows += [table_row(r, base) for r in results]
    rows.append(f"\nweights: {weight_bytes / GB:.3f} GB ({weight_bytes} bytes); GB = 1e9 bytes; "
                "peak RSS = ru_maxrss of the contender's own process (GNU time %M, i.e. wait4).")
    for r in results:
        if r.error_tail:
            rows.append(f"\n{r.name} ({r.status}), last lines of its output:\n```\n{r.error_tail}\n```")
    return "\n".join(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.5, help="weight size in GB (1e9 bytes); default 2.5")
    p.add_argument("--channels", type=int, default=4096, help="Conv channels C (weight C*C*4 bytes per block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contenders", nargs="+", default=["ogt", "onnxslim", "onnxsim"],
                   help="subset/order of: ogt onnxslim onnxsim onnxsim-cli")
    p.add_argument("--timeout", type=float, default=3600, help="per-contender limit in seconds")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--json", type=Path, default=None, help="default: WORK_DIR/bn_fold_large.json")
    p.add_argument("--bin-dir", type=Path, default=Path(sys.executable).parent,
                   help="where the ogt/onnxslim/onnxsim scripts live (default: this python's bin/)")
    p.add_argument("--keep-outputs", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    work: Path = args.work_dir.resolve()
    spec = StackSpec(gb=args.gb, channels=args.channels, seed=args.seed)
    model, gen_s = ensure_stack(spec, work)
    data = model.with_name(model.name + ".data")
    weight_bytes = external_weight_bytes(model)
    print(f"model: {model} ({spec.blocks} blocks, C={spec.channels}, weights {weight_bytes / GB:.3f} GB"
          + (f", generated in {gen_s:.1f} s)" if gen_s is not None else ", cached)"), flush=True)

    ref = (work / f"{spec.stem}.input.npz", work / f"{spec.stem}.ref.npz")
    if not ref[1].exists():
        rm = run_child(["reference", str(model), str(ref[0]), str(ref[1]), "--seed", str(spec.seed)], work,
                       work / "reference.log")
        if rm.returncode != 0:
            print(tail(work / "reference.log"), file=sys.stderr)
            return 1

    table = contenders(args.bin_dir, sys.executable)
    results: list[Result] = []
    for name in args.contenders:
        c = table[name]
        if name == "ogt" and not ogt_available(args.bin_dir):
            results.append(Result(c.name, c.tool, c.command(model, Path("OUT")), "not available"))
            print(f"[{name}] not available (no working `ogt transform --help`)", flush=True)
            continue
        warm_page_cache([model, data])
        print(f"[{name}] running ...", flush=True)
        r = bench_one(c, model, weight_bytes, ref, work, args.timeout, args.keep_outputs)
        results.append(r)
        print(f"[{name}] {table_row(r, None)}", flush=True)

    report = {
        "benchmark": "bn_fold_large",
        "model": {"path": str(model), **asdict(spec), "blocks": spec.blocks, "weight_bytes": weight_bytes,
                  "generate_s": gen_s},
        "machine": machine_info(),
        "equivalence": {"rtol": RTOL, "atol": f"{ATOL_FRACTION} * max|ref|",
                        "runtime": "onnxruntime CPU, ORT_DISABLE_ALL"},
        "results": [asdict(r) for r in results],
    }
    json_path = args.json or work / "bn_fold_large.json"
    json_path.write_text(json.dumps(report, indent=2))
    print()
    print(f"machine: {json.dumps(report['machine'])}")
    print(markdown(results, weight_bytes))
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
