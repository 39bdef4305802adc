"""2:4 sparsity: ogt prune-nm (magnitude, activation-aware) against onnxsim's N:M pruning, then int8.

Subjects and data are those of ``quantize_compare.py`` (``_quant_children``): MobileNetV2 on photo
crops (fidelity: top-1 agreement with float, logit SQNR) and paraphrase-MiniLM-L3 on stdlib
sentences (fidelity: cosine of the sentence embeddings with float); calibration and evaluation
sets never overlap. Every contender gets the same input model (the float model after ogt's
fold-batchnorm + cleanup, so all of them see BN-free Conv weights) and the same calibration file,
and runs in its own process (wall time and peak RSS measured by the shared harness):

- ``ogt-magnitude``: ``ogt prune --criterion magnitude``;
- ``ogt-activation``: ``ogt prune --criterion activation --calib-data calib.npz`` (Wanda-style);
- ``ogt-<criterion>-min320``: the same with ``--min-channels 320`` (only wide layers pruned);
- ``onnxsim-magnitude``: ``onnxsim.apply_magnitude_pruning(model, n=2, m=4)``;
- ``onnxsim-wanda``: ``onnxsim.apply_wanda_pruning(model, calibration_data=<same batches>, n=2, m=4)``.

Each output is then quantized by ``ogt quantize`` (minmax, target ort, defaults otherwise; the
float model too, as the "dense int8" row) and every model is evaluated in a child process:
fidelity against the float model on the evaluation set, the fraction of weights zeroed, and how
many weights are 2:4 sparse along the reduction axis in TensorRT's layout (``ogt.sparsity``;
for int8 models, read through DequantizeLinear). Then, in this process: weight bytes of MiniLM
packed by pack-nm against dense, and onnxruntime CPU latency of ``Sparse24MatMul`` (the
onnxruntime-extensions kernel) against a dense MatMul at transformer shapes, timed in
alternating blocks (``_quant_children.latency_ms``). ``--gpu`` adds the Triton kernel against
dense ``torch.matmul`` (and PyTorch's cuSPARSELt/CUTLASS 2:4 path) where CUDA and triton exist.

    python benchmarks/sparsity_compare.py                     # both subjects, 64 calibration samples
    python benchmarks/sparsity_compare.py --subjects minilm_l3 --eval-samples 128

Results: Markdown on stdout and ``benchmarks/work/sparsity_compare.json``; models and logs under
``benchmarks/work/sparsity/<subject>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_info, run_measured, tail
from _quant_children import (
    SUBJECTS,
    NpzSamples,
    _run_output,
    _session,
    child_prepare,
    child_reference,
    fidelity,
    latency_ms,
)

BENCH_DIR = Path(__file__).resolve().parent
CHILD = "_child"
BATCH = 8
PACKAGES = ("ogt", "onnx", "onnxruntime", "onnxruntime-extensions", "numpy", "onnxsim")
SHAPES = ((1024, 384, 1536), (1024, 1536, 384), (128, 384, 1536))  # (M = batch x tokens, K, N)


def contenders(ogt_bin: str, base: Path, calib: Path) -> dict[str, list[str]]:
    me = [sys.executable, str(Path(__file__).resolve()), CHILD]
    return {
        "ogt-magnitude": [ogt_bin, "prune", str(base), "-o", "{out}", "--criterion", "magnitude", "--quiet"],
        "ogt-activation": [ogt_bin, "prune", str(base), "-o", "{out}", "--criterion", "activation",
                           "--calib-data", str(calib), "--batch-size", str(BATCH), "--quiet"],
        # the sparing operating point: only layers with >= 320 input and output channels (MobileNetV2: 3)
        "ogt-magnitude-min320": [ogt_bin, "prune", str(base), "-o", "{out}", "--min-channels", "320", "--quiet"],
        "ogt-activation-min320": [ogt_bin, "prune", str(base), "-o", "{out}", "--criterion", "activation",
                                  "--calib-data", str(calib), "--batch-size", str(BATCH), "--min-channels", "320",
                                  "--quiet"],
        "onnxsim-magnitude": [*me, "onnxsim", "magnitude", str(base), "{out}", str(calib)],
        "onnxsim-wanda": [*me, "onnxsim", "wanda", str(base), "{out}", str(calib)],
    }


# --------------------------------------------------------------------------- children


def child_base(model: Path, out: Path) -> None:
    import ogt

    result = ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(ogt.load(model))
    ogt.save(result.graph, out)


def child_onnxsim(method: str, model: Path, out: Path, calib: Path) -> None:
    import onnx
    from onnxsim.pruning import apply_magnitude_pruning, apply_wanda_pruning

    if method == "magnitude":
        pruned = apply_magnitude_pruning(str(model), n=2, m=4)
    else:
        pruned = apply_wanda_pruning(str(model), calibration_data=list(NpzSamples(calib, BATCH)), n=2, m=4)
    onnx.save(pruned, str(out))


def child_evaluate(subject_name: str, model: Path, eval_npz: Path, ref_npz: Path, labels: Path, out_json: Path) -> None:
    import ogt
    from ogt.sparsity import sparsity_report

    subject = SUBJECTS[subject_name]
    inputs = dict(np.load(eval_npz))
    y = _run_output(_session(model), subject.output, inputs)
    result = {"fidelity": fidelity(subject.kind, y, np.load(ref_npz)["y"], np.load(labels) if labels.exists() else None)}
    report = sparsity_report(ogt.load(model))
    zeros = [(w.zero_fraction, w.reduction * w.outputs) for w in report if w.zero_fraction is not None and w.reduction]
    total = sum(n for _, n in zeros)
    result["sparsity"] = {
        "weights": len(report),
        "nm_2_4": sum(w.sparse for w in report),
        "zero_fraction": sum(z * n for z, n in zeros) / total if total else 0.0,
        "not_2_4_but_pruned": sum(1 for w in report if not w.sparse and (w.zero_fraction or 0) > 0.4),
    }
    out_json.write_text(json.dumps(result))


def child_main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "prepare":
        child_prepare(SUBJECTS[rest[0]], Path(rest[1]), [int(rest[2])], int(rest[3]))
    elif cmd == "reference":
        child_reference(SUBJECTS[rest[0]], Path(rest[1]), Path(rest[2]), Path(rest[3]))
    elif cmd == "base":
        child_base(Path(rest[0]), Path(rest[1]))
    elif cmd == "onnxsim":
        child_onnxsim(rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3]))
    elif cmd == "evaluate":
        child_evaluate(rest[0], *(Path(r) for r in rest[1:]))
    else:
        raise SystemExit(f"unknown child command {cmd}")


# --------------------------------------------------------------------------- harness side


def run_child(argv: list[str], work: Path, name: str, timeout: float = 1800) -> dict:
    log = work / f"{name}.log"
    m = run_measured(argv, BENCH_DIR.parent, log, timeout)
    if not m.ok:
        print(f"  {name}: {m.status()}\n{tail(log)}", file=sys.stderr)
    return {"status": m.status(), "wall_s": round(m.wall_s, 2), "peak_rss_mb": round(m.peak_rss_bytes / 2**20)}


def bench_subject(name: str, args, ogt_bin: str) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), CHILD]
    work = args.work / "sparsity" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run_child([*me, "prepare", name, str(work), str(args.calib_samples), str(args.eval_samples)], work, "prepare")
    prep = json.loads((work / "prepare.json").read_text())
    calib, eval_npz = Path(prep["calib_files"][str(args.calib_samples)]), work / "eval.npz"
    ref, labels, base = work / "reference.npz", work / "eval_labels.npy", work / "base.onnx"
    run_child([*me, "reference", name, prep["model"], str(eval_npz), str(ref)], work, "reference")
    run_child([*me, "base", prep["model"], str(base)], work, "base")
    rows: dict[str, dict] = {"dense": {"prune": None, "model": str(base)}}
    for cname, argv in contenders(ogt_bin, base, calib).items():
        out = work / f"{cname}.onnx"
        print(f"[{name}] {cname}", file=sys.stderr)
        rows[cname] = {"prune": run_child([a.replace("{out}", str(out)) for a in argv], work, cname), "model": str(out)}
    for cname, row in list(rows.items()):
        if not Path(row["model"]).exists():
            continue
        q = work / f"{cname}.int8.onnx"
        print(f"[{name}] {cname} -> int8", file=sys.stderr)
        row["quantize"] = run_child([ogt_bin, "quantize", row["model"], "-o", str(q), "--calib-data", str(calib),
                                     "--batch-size", str(BATCH), "--quiet"], work, f"{cname}.int8")
        row["int8_model"] = str(q)
        for key, path in (("float", Path(row["model"])), ("int8", q)):
            if path.exists():
                out = work / f"{path.stem}.eval.json"
                run_child([*me, "evaluate", name, str(path), str(eval_npz), str(ref), str(labels), str(out)], work,
                          f"{path.stem}.eval")
                row[key] = json.loads(out.read_text()) if out.exists() else None
    return {"prepare": {k: prep[k] for k in ("n_eval", "calib_eval_overlap")}, "calib_samples": args.calib_samples,
            "rows": rows}


def packed_bytes(work: Path) -> dict | None:
    """MiniLM pruned by ogt (activation) then packed: linear-weight and file bytes against dense."""
    import ogt
    from ogt.transforms.pack_nm import PackNM

    src = work / "sparsity" / "minilm_l3" / "ogt-activation.onnx"
    if not src.exists():
        return None
    result = PackNM()(ogt.load(src))
    out = src.with_name("ogt-activation.packed.onnx")
    ogt.save(result.graph, out)
    return {"layers": result.counts.get("pack-nm.matmul", 0) + result.counts.get("pack-nm.gemm", 0),
            "dense_bytes": result.counts["pack-nm.dense-bytes"], "packed_bytes": result.counts["pack-nm.packed-bytes"],
            "file_dense": src.stat().st_size, "file_packed": out.stat().st_size}


def cpu_latency(runs: int, min_seconds: float) -> list[dict]:
    """onnxruntime CPU: Sparse24MatMul (onnxruntime-extensions kernel) vs a dense MatMul, and the numpy kernel alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ogt.kernels import ort as kort
    from ogt.kernels import sparse24
    from ogt.transforms import _nm

    out = []
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        pruned, _ = _nm.prune_rows(w, np.abs(w), 2, 4)
        values, meta = sparse24.pack(pruned)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
        dense = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "dense", [x_info],
                                                    [y_info], [numpy_helper.from_array(np.ascontiguousarray(pruned.T), "W")]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        packed = helper.make_model(helper.make_graph(
            [helper.make_node(sparse24.OP_TYPE, ["x", "v", "meta"], ["y"], domain=sparse24.DOMAIN)], "packed", [x_info],
            [y_info], [numpy_helper.from_array(values, "v"), numpy_helper.from_array(meta, "meta")]),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(sparse24.DOMAIN, 1)])
        sessions = {"dense": ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]),
                    "packed": kort.session(onnx.ModelProto.FromString(packed.SerializeToString()))}
        x = rng.standard_normal((m, k)).astype(np.float32)
        t = _latency(sessions, x, runs, min_seconds)
        start = time.perf_counter()
        for _ in range(runs):
            sparse24.sparse24_matmul(x, values, meta)
        numpy_ms = 1000 * (time.perf_counter() - start) / runs
        out.append({"m": m, "k": k, "n": n, "dense_ms": t["dense"]["median"], "packed_ms": t["packed"]["median"],
                    "numpy_kernel_ms": numpy_ms, "ratio": t["packed"]["median"] / t["dense"]["median"]})
    return out


def _latency(sessions: dict, x: np.ndarray, runs: int, min_seconds: float) -> dict:
    """latency_ms slices its inputs to a batch on axis 0: feed the whole [M, K] as one sample of [1, M, K]."""
    wrapped = {k: _Squeeze(s) for k, s in sessions.items()}
    return latency_ms(wrapped, {"x": x[None]}, 1, runs, 3, min_seconds)


class _Squeeze:
    """A session whose input arrives with a leading axis of 1 (latency_ms's batch slicing) and is run without it."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feed):
        return self.session.run(names, {k: v[0] for k, v in feed.items()})


def gpu_latency() -> dict:
    from ogt.kernels import gpu

    reason = gpu.unavailable_reason()
    if reason is not None:
        return {"run": False, "reason": reason}
    import torch

    from ogt.kernels import sparse24
    from ogt.transforms import _nm

    rows = []
    for m, k, n in ((4096, 4096, 4096), (8192, 4096, 11008), (16384, 8192, 8192)):
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
        pruned, _ = _nm.prune_rows(w, np.abs(w), 2, 4)
        values, meta = sparse24.pack(pruned)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        v, mt = torch.from_numpy(values).cuda().half(), torch.from_numpy(meta).cuda()
        wd = torch.from_numpy(pruned).cuda().half()
        fns = {"dense": lambda x=x, wd=wd: x @ wd.T, "triton": lambda x=x, v=v, mt=mt: gpu.sparse24_matmul(x, v, mt)}
        try:
            ws = gpu.semi_structured_weight(v, mt)
            fns["torch-2:4"] = lambda x=x, ws=ws: torch.nn.functional.linear(x, ws)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rows.append({"note": f"semi-structured unavailable: {exc}"})
        times = {}
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            times[name] = 1000 * (time.perf_counter() - start) / 20
        rows.append({"m": m, "k": k, "n": n, **{f"{k_}_ms": v_ for k_, v_ in times.items()}})
    return {"run": True, "device": torch.cuda.get_device_name(), "rows": rows}


def markdown(results: dict) -> str:
    lines = []
    for name, res in results["subjects"].items():
        kind = SUBJECTS[name].kind
        metric = "top-1 agr. / SQNR dB" if kind == "classifier" else "cos mean / min"
        lines += [f"### {name} (eval {res['prepare']['n_eval']}, calibration {res['calib_samples']})", "",
                  f"| contender | 2:4 weights | zeros | float: {metric} | int8: {metric} | prune s | prune RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        for cname, row in res["rows"].items():
            def fid(ev, kind=kind):
                if not ev:
                    return "-"
                f = ev["fidelity"]
                if kind == "classifier":
                    return f"{f['top1_agreement']:.3f} / {f['sqnr_db']:.1f}" if f["sqnr_db"] is not None else "1.000 / inf"
                return f"{f['cos_mean']:.4f} / {f['cos_min']:.4f}"

            sp = (row.get("float") or {}).get("sparsity", {})
            prune = row.get("prune") or {}
            lines.append(f"| {cname} | {sp.get('nm_2_4', '-')}/{sp.get('weights', '-')} | {sp.get('zero_fraction', 0):.1%} | "
                         f"{fid(row.get('float'))} | {fid(row.get('int8'))} | {prune.get('wall_s', '-')} | "
                         f"{prune.get('peak_rss_mb', '-')} |")
        lines.append("")
    pb = results.get("packed_bytes")
    if pb:
        lines += [f"Packed MiniLM ({pb['layers']} linear layers): weights {pb['dense_bytes'] / 2**20:.2f} MiB dense -> "
                  f"{pb['packed_bytes'] / 2**20:.2f} MiB packed ({pb['packed_bytes'] / pb['dense_bytes']:.1%}); file "
                  f"{pb['file_dense'] / 2**20:.1f} -> {pb['file_packed'] / 2**20:.1f} MiB", ""]
    lines += ["| M x K x N | dense MatMul ms | Sparse24MatMul ms | ratio | numpy kernel alone ms |", "|---|---|---|---|---|"]
    for r in results.get("cpu_latency", []):
        lines.append(f"| {r['m']}x{r['k']}x{r['n']} | {r['dense_ms']:.2f} | {r['packed_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['numpy_kernel_ms']:.2f} |")
    g = results.get("gpu", {})
    lines += ["", f"GPU: {'run on ' + g['device'] if g.get('run') else 'not run (' + g.get('reason', '?') + ')'}"]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", nargs="+", default=["mobilenet_v2", "minilm_l3"], choices=["mobilenet_v2", "minilm_l3"])
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--latency-seconds", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="Also time the Triton kernel (needs CUDA and triton).")
    p.add_argument("--work", type=Path, default=BENCH_DIR / "work")
    args = p.parse_args()
    ogt_bin = str(Path(sys.executable).with_name("ogt"))
    results: dict = {"machine": machine_info(PACKAGES), "subjects": {}}
    for name in args.subjects:
        results["subjects"][name] = bench_subject(name, args, ogt_bin)
    results["packed_bytes"] = packed_bytes(args.work)
    results["cpu_latency"] = cpu_latency(args.latency_runs, args.latency_seconds)
    results["gpu"] = gpu_latency() if args.gpu else {"run": False, "reason": "--gpu not given"}
    (args.work / "sparsity_compare.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
