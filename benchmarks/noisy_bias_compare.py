"""Noisy bias (issue 5): ``ogt quantize --noisy-bias`` against the same quantization without it.

Subjects and data are those of ``quantize_compare.py`` (``_quant_children``; the calibration,
evaluation and float-reference files under ``benchmarks/work/quantize/<subject>/`` are reused
when present, else prepared): paraphrase-MiniLM-L3 (output "461": cosine of the sentence
embeddings with float, 256 evaluation sentences) at W8A6 and W8A4 with minmax, percentile and
token-clip calibration; MobileNetV2 (top-1 agreement with float and logit SQNR, 256 crops) at
W8A6 with minmax and percentile. Target ort, default placement, 64 calibration samples, each
setting with and without ``--noisy-bias`` (its defaults: the block objective on MiniLM, which has
LayerNorms, the layer objective on MobileNetV2, which has none).

Every quantization runs in its own process (``ogt quantize``; wall time and peak RSS by the
shared harness) and writes its report; the per-layer rows of its ``noisy_bias`` key give the
kept/declined counts and the distribution of each examined quantizer's layer-error change (dB,
positive = lower error; declined layers count 0) and, for the block objective, of the block
error change. One evaluation child per subject then measures fidelity of every model and the
onnxruntime CPU latency (default session options, batch 8) of each noisy model against its
noise-free twin, timed in alternating blocks (``_quant_children.latency_ms``).

    python benchmarks/noisy_bias_compare.py
    python benchmarks/noisy_bias_compare.py --subjects minilm_l3 --methods minmax

Results: Markdown on stdout and ``benchmarks/work/noisy_bias/noisy_bias_compare.json``; models,
reports and logs under ``benchmarks/work/noisy_bias/<subject>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_info, run_measured, tail
from _quant_children import (
    SUBJECTS,
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
CALIB = 64
PACKAGES = ("ogt", "onnx", "onnxruntime", "numpy")
SETTINGS = {  # subject -> [(act bits, method)]
    "minilm_l3": [(b, m) for b in (6, 4) for m in ("minmax", "percentile", "token-clip")],
    "mobilenet_v2": [(6, m) for m in ("minmax", "percentile")],
}


def child_evaluate(subject_name: str, manifest: Path, out_json: Path, seconds: float) -> None:
    subject = SUBJECTS[subject_name]
    m = json.loads(manifest.read_text())
    inputs = dict(np.load(m["eval"]))
    ref = np.load(m["ref"])["y"]
    labels = np.load(m["labels"]) if m.get("labels") and Path(m["labels"]).exists() else None
    out = {}
    for key, pair in m["pairs"].items():
        sessions = {v: _session(Path(p)) for v, p in pair.items() if Path(p).exists()}
        row = {v: fidelity(subject.kind, _run_output(s, subject.output, inputs), ref, labels) for v, s in sessions.items()}
        if len(sessions) == 2:
            t = latency_ms(sessions, inputs, BATCH, 10, 3, seconds)
            row["latency_ms"] = {v: t[v]["median"] for v in t}
            row["latency_ratio"] = t["noisy"]["median"] / t["plain"]["median"]
        out[key] = row
    out_json.write_text(json.dumps(out))


def child_main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "prepare":
        child_prepare(SUBJECTS[rest[0]], Path(rest[1]), [CALIB], int(rest[2]))
    elif cmd == "reference":
        child_reference(SUBJECTS[rest[0]], Path(rest[1]), Path(rest[2]), Path(rest[3]))
    elif cmd == "evaluate":
        child_evaluate(rest[0], Path(rest[1]), Path(rest[2]), float(rest[3]))
    else:
        raise SystemExit(f"unknown child command {cmd}")


def run_child(argv: list[str], work: Path, name: str, timeout: float = 900) -> dict:
    log = work / f"{name}.log"
    m = run_measured(argv, BENCH_DIR.parent, log, timeout)
    if not m.ok:
        print(f"  {name}: {m.status()}\n{tail(log)}", file=sys.stderr)
    return {"status": m.status(), "wall_s": round(m.wall_s, 2), "peak_rss_mb": round(m.peak_rss_bytes / 2**20)}


def data_files(name: str, args, me: list[str]) -> dict[str, str]:
    """Calibration/eval/reference files: the quantize benchmark's when present, else prepared here."""
    work = args.work / "quantize" / name
    if not (work / f"calib_{CALIB}.npz").exists() or not (work / "ref.npz").exists():
        work = args.work / "noisy_bias" / name / "data"
        work.mkdir(parents=True, exist_ok=True)
        run_child([*me, "prepare", name, str(work), str(SUBJECTS[name].n_eval)], work, "prepare")
        prep = json.loads((work / "prepare.json").read_text())
        run_child([*me, "reference", name, prep["model"], str(work / "eval.npz"), str(work / "ref.npz")], work, "reference")
    prep = json.loads((work / "prepare.json").read_text())
    return {"model": prep["model"], "calib": str(work / f"calib_{CALIB}.npz"), "eval": str(work / "eval.npz"),
            "ref": str(work / "ref.npz"), "labels": str(work / "eval_labels.npy"), "n_eval": prep["n_eval"],
            "overlap": prep.get("calib_eval_overlap")}


def layer_stats(report: dict) -> dict:
    rows = report.get("noisy_bias") or []
    if not rows:
        return {"examined": 0}
    gain = [r["gain_db"] if r["kept"] else 0.0 for r in rows]
    kept_gain = [r["gain_db"] for r in rows if r["kept"]]
    block = [r.get("block_gain_db") or 0.0 for r in rows if r.get("objective") == "block"]
    out = {"examined": len(rows), "kept": sum(r["kept"] for r in rows), "objective": rows[0].get("objective", "layer"),
           "placements": sorted({r["placement"] for r in rows if r["kept"]}),
           "layer_db": [round(g, 3) for g in gain],
           "layer_db_min_median_max": [round(float(f(gain)), 3) for f in (np.min, np.median, np.max)],
           "kept_layer_db_min_median_max": [round(float(f(kept_gain)), 3) for f in (np.min, np.median, np.max)] if kept_gain else None,
           "layer_worse": sum(g < 0 for g in kept_gain)}
    if block:
        kb = [r["block_gain_db"] for r in rows if r["kept"] and r.get("block_gain_db") is not None]
        out["block_db_min_median_max"] = [round(float(f(block)), 3) for f in (np.min, np.median, np.max)]
        out["kept_block_db_min_median_max"] = [round(float(f(kb)), 3) for f in (np.min, np.median, np.max)] if kb else None
    why = {"no candidate lowered it": 0, "gain < min_gain": 0, "not confirmed on held-out samples": 0}
    for r in rows:
        if not r["kept"]:
            note = r["note"]
            key = ("not confirmed on held-out samples" if "held-out" in note else
                   "gain < min_gain" if "min_gain" in note else "no candidate lowered it")
            why[key] += 1
    out["declined_notes"] = [f"{k}: {v}" for k, v in why.items() if v]
    return out


def bench_subject(name: str, args, ogt_bin: str) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), CHILD]
    work = args.work / "noisy_bias" / name
    work.mkdir(parents=True, exist_ok=True)
    files = data_files(name, args, me)
    pairs, rows = {}, {}
    for bits, method in SETTINGS[name]:
        if method not in args.methods:
            continue
        key = f"W8A{bits} {method}"
        pair = {}
        for variant in ("plain", "noisy"):
            stem = f"a{bits}_{method}_{variant}"
            out, report = work / f"{stem}.onnx", work / f"{stem}.report.json"
            argv = [ogt_bin, "quantize", files["model"], "-o", str(out), "--calib-data", files["calib"],
                    "--batch-size", str(BATCH), "--method", method, "--act-bits", str(bits), "--target", "ort",
                    "--report", str(report), "--quiet", "--overwrite"]
            if variant == "noisy":
                argv.append("--noisy-bias")
            print(f"[{name}] {key} {variant}", file=sys.stderr, flush=True)
            measured = run_child(argv, work, stem)
            rep = json.loads(report.read_text()) if report.exists() else {}
            rows.setdefault(key, {})[variant] = {"quantize": measured, **({"noisy_bias": layer_stats(rep)} if variant == "noisy" else {})}
            pair[variant] = str(out)
        pairs[key] = pair
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({**files, "pairs": pairs}))
    ev = work / "evaluate.json"
    print(f"[{name}] evaluate", file=sys.stderr, flush=True)
    run_child([*me, "evaluate", name, str(manifest), str(ev), str(args.latency_seconds)], work, "evaluate")
    evaluated = json.loads(ev.read_text()) if ev.exists() else {}
    for key, row in rows.items():
        e = evaluated.get(key, {})
        for variant in ("plain", "noisy"):
            if variant in row:
                row[variant]["fidelity"] = e.get(variant)
        row["latency_ms"], row["latency_ratio"] = e.get("latency_ms"), e.get("latency_ratio")
    return {"n_eval": files["n_eval"], "calib_eval_overlap": files["overlap"], "rows": rows}


def _fid(f: dict | None, kind: str) -> str:
    if not f:
        return "-"
    if kind == "classifier":
        return f"{f['top1_agreement']:.3f} / {f['sqnr_db']:.2f}"
    return f"{f['cos_mean']:.4f} / {f['cos_min']:.4f}"


def markdown(results: dict) -> str:
    lines = []
    for name, res in results["subjects"].items():
        kind = SUBJECTS[name].kind
        metric = "top-1 agr. / SQNR dB" if kind == "classifier" else "cos mean / min"
        header = (f"| setting | without: {metric} | with noisy bias: {metric} | better? | kept / examined | "
                  "latency b8 ms without -> with (ratio) | quantize s without / with | peak RSS MB without / with |")
        lines += [f"### {name} (eval {res['n_eval']}, calibration {CALIB}, target ort)", "", header,
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in res["rows"].items():
            p, n = row.get("plain", {}), row.get("noisy", {})
            fp, fn = p.get("fidelity"), n.get("fidelity")
            if fp and fn:
                a, b = (fp["top1_agreement"], fn["top1_agreement"]) if kind == "classifier" else (fp["cos_mean"], fn["cos_mean"])
                sa, sb = fp["sqnr_db"] or 0, fn["sqnr_db"] or 0
                better = "yes" if (b > a or (b == a and sb > sa)) else ("same" if (b == a and sb == sa) else "no")
            else:
                better = "-"
            st = n.get("noisy_bias", {})
            lat = row.get("latency_ms") or {}
            lat_s = f"{lat['plain']:.2f} -> {lat['noisy']:.2f} ({row['latency_ratio']:.3f}x)" if lat else "-"
            lines.append(f"| W8A{key.split()[0][3:]} {key.split()[1]} | {_fid(fp, kind)} | {_fid(fn, kind)} | {better} | "
                         f"{st.get('kept', '-')} / {st.get('examined', '-')} | {lat_s} | "
                         f"{p.get('quantize', {}).get('wall_s', '-')} / {n.get('quantize', {}).get('wall_s', '-')} | "
                         f"{p.get('quantize', {}).get('peak_rss_mb', '-')} / {n.get('quantize', {}).get('peak_rss_mb', '-')} |")
        header = ("| setting | objective | layer dB min / median / max (all examined) | layer dB of kept min / median / max | "
                  "kept layers whose own error rose | block dB min / median / max | declined because |")
        lines += ["", f"Per-layer change ({name}; dB, positive = lower error; declined layers count 0):", "", header,
                  "|---|---|---|---|---|---|---|"]
        for key, row in res["rows"].items():
            st = row.get("noisy", {}).get("noisy_bias") or {}
            if not st.get("examined"):
                lines.append(f"| {key} | - | no site examined | | | | |")
                continue
            f3 = lambda v: " / ".join(f"{x:+.3f}" for x in v) if v else "-"
            lines.append(f"| {key} | {st['objective']} | {f3(st['layer_db_min_median_max'])} | "
                         f"{f3(st.get('kept_layer_db_min_median_max'))} | {st['layer_worse']} | "
                         f"{f3(st.get('block_db_min_median_max'))} | {'; '.join(st['declined_notes'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile", "token-clip"],
                   choices=["minmax", "percentile", "token-clip"])
    p.add_argument("--latency-seconds", type=float, default=4.0)  # 1 s: +-7% between identical graphs here
    p.add_argument("--work", type=Path, default=BENCH_DIR / "work")
    args = p.parse_args()
    ogt_bin = str(Path(sys.executable).with_name("ogt"))
    results: dict = {"machine": machine_info(PACKAGES), "subjects": {}}
    for name in args.subjects:
        results["subjects"][name] = bench_subject(name, args, ogt_bin)
    out = args.work / "noisy_bias" / "noisy_bias_compare.json"
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
