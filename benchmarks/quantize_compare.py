"""Static int8 quantization of three real models: ogt vs onnxruntime.quantization vs onnxsim.

Subjects (built by the recipes in ``models/``; calibration and evaluation data never overlap):

- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2, BatchNorms kept; crops of the photos
  bundled in scikit-image and scikit-learn. Fidelity: top-1 agreement with float, logit SQNR.
- ``minilm_l3``: paraphrase-MiniLM-L3-v2 as shipped; stdlib docstring sentences. Fidelity:
  cosine similarity of the sentence embeddings with float (mean and worst).
- ``digits_cnn``: a small Conv+BN CNN trained on scikit-learn's digits. Fidelity: accuracy on
  the held-out test split (and top-1 agreement with float).

For each subject, one run on the same data: the calibration set is written once to
``calib_<n>.npz`` (keyed by input name, samples on axis 0; a larger set extends a smaller one)
and every contender runs in its own process, measured for wall time and its own peak RSS:

- ``ort-<method>-<u8|s8>``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel
  int8 weights) with CalibrationMethod MinMax / Percentile / Entropy; ``u8`` = uint8
  activations, ``s8`` = symmetric int8 activations (``ActivationSymmetric=True``),
- ``onnxsim-<method>``: ``onnxsim.simplify`` (shape inference; without it onnxsim quantizes
  only the ops fed by a graph input) then ``onnxsim.quantize_static`` (its default scheme: QDQ on
  Conv/MatMul/Gemm inputs, uint8 activations) with minmax / percentile / entropy / mse;
  ``onnxsim-minmax-raw`` (opt in with ``--contenders``) skips the simplify,
- ``ogt-<method>-<target>``: ``ogt quantize`` with methods minmax / percentile / entropy / mse
  and targets ort / tensorrt (reported "not available" while ``ogt quantize --help`` fails);
  ``ogt-<entropy|mse>-weighted``: ``--target ort --placement weighted`` (Q/DQ only on the inputs
  of Conv/Gemm/MatMul: the fidelity-first operating point, comparable to onnxsim's placement).

Then, in separate processes, each output (and the float model) is evaluated: fidelity on the
evaluation set, onnxruntime CPU latency (default session options, median of ``--latency-runs``
after warm-up) at batch 1 and 8, file size, float weights left in the file, Q/DQ counts, and
``ogt lint --target tensorrt --json`` violations when that command exists.

The peers get the calibration set one batch at a time, read on demand from the .npz, so their
peak RSS is their own working memory, not the data set's size. A contender whose process group
holds more than ``--rss-limit-gb`` (default 18) is killed and reported as such (its real peak
was higher). Latency is timed in alternating blocks against the float model inside one process,
so the ratio to float survives a busy machine better than the absolute milliseconds do; still,
on a shared 2-core machine expect ratios to move by tens of percent between runs.

    python benchmarks/quantize_compare.py                                   # all, 64 samples
    python benchmarks/quantize_compare.py --subjects mobilenet_v2 --calib-samples 64 512

Results: Markdown tables on stdout and ``benchmarks/work/quantize_compare_<...>.json``; logs and
outputs under ``benchmarks/work/quantize/<subject>/c<n>/<contender>/``.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import GB, MB, Measurement, fmt, machine_info, run_measured, tail
from _quant_children import SUBJECTS, Subject

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORK_DIR = BENCH_DIR / "work"
CHILD = "_child"
PACKAGES = ("ogt", "onnx", "onnxruntime", "numpy", "onnxsim", "torch", "tokenizers", "scikit-learn",
            "scikit-image", "pillow")
OGT_QUANTIZE = "ogt quantize {model} -o {out} --calib-data {npz} --method {method} --target {target} --quiet"
OGT_LINT = "ogt lint --target tensorrt --json {model}"
OGT_METHODS = ("minmax", "percentile", "entropy", "mse")
OGT_TARGETS = ("ort", "tensorrt")


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    name: str
    family: str  # "ogt", "ort", "onnxsim"
    tool: str  # what it runs, for the report
    argv: tuple[str, ...]  # with {model} {out} {npz} {batch} {report} placeholders

    def command(self, **values: object) -> list[str]:
        return [a.format(**values) for a in self.argv]


def contenders(ogt_template: str) -> list[Contender]:
    me = (sys.executable, str(Path(__file__).resolve()), CHILD)
    out: list[Contender] = []
    for method in OGT_METHODS:
        for target in OGT_TARGETS:
            argv = shlex.split(ogt_template.replace("{method}", method).replace("{target}", target))
            out.append(Contender(f"ogt-{method}-{target}", "ogt", f"ogt quantize --method {method} --target {target}",
                                 tuple(argv)))
    for method in ("entropy", "mse"):  # fidelity-first operating point: Q/DQ only on weighted ops' inputs
        argv = shlex.split(ogt_template.replace("{method}", method).replace("{target}", "ort")) + ["--placement", "weighted"]
        out.append(Contender(f"ogt-{method}-weighted", "ogt",
                             f"ogt quantize --method {method} --target ort --placement weighted", tuple(argv)))
    for method in ("minmax", "percentile", "entropy"):
        for variant, what in (("u8", "uint8 activations"), ("s8", "symmetric int8 activations")):
            out.append(Contender(
                f"ort-{method}-{variant}", "ort",
                f"onnxruntime quant_pre_process + quantize_static(QDQ, per-channel, {method}, {what})",
                (*me, "quantize-ort", "{model}", "{out}", "{npz}", "--method", method, "--variant", variant,
                 "--batch", "{batch}", "--report", "{report}")))
    for method in ("minmax", "percentile", "entropy", "mse"):
        out.append(Contender(
            f"onnxsim-{method}", "onnxsim", f"onnxsim.simplify + onnxsim.quantize_static(method={method!r})",
            (*me, "quantize-onnxsim", "{model}", "{out}", "{npz}", "--method", method, "--prep", "simplify",
             "--batch", "{batch}", "--report", "{report}")))
    return out


# Not in the default set (select with --contenders): onnxsim on the model exactly as exported.
EXTRA_CONTENDERS = ("onnxsim-minmax-raw",)


def extra_contenders() -> list[Contender]:
    me = (sys.executable, str(Path(__file__).resolve()), CHILD)
    return [Contender("onnxsim-minmax-raw", "onnxsim", "onnxsim.quantize_static(method='minmax') on the model as is",
                      (*me, "quantize-onnxsim", "{model}", "{out}", "{npz}", "--method", "minmax", "--prep", "raw",
                       "--batch", "{batch}", "--report", "{report}"))]


def ogt_command_works(template: str, bin_dir: Path) -> bool:
    """Whether ``<first word of template> <second word> --help`` runs (e.g. ``ogt quantize --help``)."""
    words = shlex.split(template)[:2]
    exe = shutil.which(words[0], path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, words[1], "--help"], check=False, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def resolve_exe(argv: list[str], bin_dir: Path) -> list[str]:
    exe = shutil.which(argv[0], path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return [exe or argv[0], *argv[1:]]


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    subject: str
    calib_samples: int | None  # None for the float model
    name: str
    family: str
    tool: str
    command: list[str]
    status: str
    measurement: Measurement | None = None
    tool_report: dict | None = None  # what the child timed inside (pre-process vs quantize)
    evaluation: dict | None = None
    lint: dict | None = None
    error_tail: str | None = None


def run_child(args: Sequence[str], cwd: Path, log: Path, timeout_s: float = 3600) -> Measurement:
    return run_measured([sys.executable, str(Path(__file__).resolve()), CHILD, *map(str, args)], cwd, log, timeout_s)


def evaluate(subject: Subject, model: Path, sdir: Path, out_dir: Path, args: argparse.Namespace,
             float_model: Path | None = None) -> tuple[dict | None, str | None]:
    labels = sdir / "eval_labels.npy"
    eval_json = out_dir / "evaluate.json"
    cmd = ["evaluate", subject.name, model, sdir / "eval.npz", sdir / "ref.npz", eval_json,
           "--runs", args.latency_runs, "--warmup", args.latency_warmup, "--seconds", args.latency_seconds]
    if labels.exists():
        cmd += ["--labels", labels]
    if float_model is not None:
        cmd += ["--float-model", float_model]
    m = run_child(cmd, out_dir, out_dir / "evaluate.log")
    if m.returncode != 0 or not eval_json.exists():
        return None, tail(out_dir / "evaluate.log")
    return json.loads(eval_json.read_text()), None


def lint(model: Path, template: str, bin_dir: Path, out_dir: Path) -> dict:
    """Run the lint command; count violations from its JSON (``violations``: list or int) or its lines."""
    argv = resolve_exe(shlex.split(template.replace("{model}", str(model))), bin_dir)
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600, cwd=out_dir)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"command": argv, "error": str(exc)}
    (out_dir / "lint.log").write_text(proc.stdout + proc.stderr)
    count: int | None = None
    rules: dict[str, int] = {}
    try:
        parsed = json.loads(proc.stdout)
        found = parsed.get("violations", parsed.get("count")) if isinstance(parsed, dict) else parsed
        count = len(found) if isinstance(found, list) else int(found)
        if isinstance(found, list):
            rules = dict(collections.Counter(str(v.get("rule")) for v in found if isinstance(v, dict)))
    except (ValueError, TypeError, AttributeError):
        count = sum(1 for line in proc.stdout.splitlines() if line.strip())
    return {"command": argv, "returncode": proc.returncode, "violations": count, "rules": rules}


def bench_one(c: Contender, subject: Subject, model: Path, sdir: Path, n: int, args: argparse.Namespace,
              lint_ok: bool) -> Result:
    out_dir = sdir / f"c{n}" / c.name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    out = out_dir / f"{c.name}.onnx"
    report = out_dir / "tool_report.json"
    cmd = c.command(model=model, out=out, npz=sdir / f"calib_{n}.npz", batch=args.calib_batch, report=report)
    if c.family == "ogt":
        cmd = resolve_exe(cmd, args.bin_dir)
    m = run_measured(cmd, out_dir, out_dir / "run.log", args.timeout, int(args.rss_limit_gb * GB))
    r = Result(subject.name, n, c.name, c.family, c.tool, cmd, m.status(), m)
    if not m.ok or not out.exists():
        r.status = r.status if not m.ok else "no output"
        r.error_tail = tail(out_dir / "run.log")
        return r
    if report.exists():
        r.tool_report = json.loads(report.read_text())
    r.evaluation, err = evaluate(subject, out, sdir, out_dir, args, float_model=model)
    if err:
        r.status, r.error_tail = "output fails to run", err
    if lint_ok:
        r.lint = lint(out, args.lint_command, args.bin_dir, out_dir)
    if not args.keep_outputs and not in_duel(c):
        out.unlink(missing_ok=True)
    return r


def in_duel(c: Contender) -> bool:
    """Outputs timed head to head after a subject's contenders: ogt's --target ort, onnxruntime's u8."""
    return (c.family == "ogt" and c.name.endswith("-ort")) or (c.family == "ort" and c.name.endswith("-u8"))


def latency_duel(subject: Subject, model: Path, sdir: Path, n: int, results: list[Result],
                 args: argparse.Namespace) -> dict | None:
    """Time float, every ogt ort-target output and every onnxruntime u8 output in ONE process.

    The per-contender latency columns are each timed against float in their own process, minutes
    apart; on this shared machine that spread (about +-30 %) is larger than the differences the
    '>= 0.9x as fast as onnxruntime's u8' bar is about. Here they alternate in blocks.
    """
    models = {"float": model}
    for r in results:
        path = sdir / f"c{n}" / r.name / f"{r.name}.onnx"
        if r.calib_samples == n and r.status == "ok" and path.exists():
            models[r.name] = path
    if not any(name.startswith("ogt-") for name in models) or not any(name.startswith("ort-") for name in models):
        return None
    out = sdir / f"c{n}" / "latency_duel.json"
    cmd = ["latency", *[f"{k}={v}" for k, v in models.items()], "--eval-npz", sdir / "eval.npz", "--out-json", out,
           "--runs", args.latency_runs, "--warmup", args.latency_warmup, "--seconds", 2 * args.latency_seconds]
    m = run_child(cmd, sdir / f"c{n}", sdir / f"c{n}" / "latency_duel.log")
    if not args.keep_outputs:
        for name, path in models.items():
            if name != "float":
                path.unlink(missing_ok=True)
    if m.returncode != 0 or not out.exists():
        print(f"[{subject.name} c{n}] latency duel failed:\n{tail(sdir / f'c{n}' / 'latency_duel.log')}", flush=True)
        return None
    return json.loads(out.read_text())


def duel_table(duel: dict) -> str:
    """ms per model and batch; x float; ogt rows also x the fastest onnxruntime u8 (time ratio, < 1 = faster)."""
    batches = sorted(duel, key=int)
    names = list(duel[batches[0]])
    head = ["model"] + [f"b{b} ms (x float)" for b in batches] + [f"b{b} time / fastest ort u8" for b in batches]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        cells, vs_ort = [], []
        for b in batches:
            med = duel[b][name]["median"]
            cells.append(f"{med:.3g} ({med / duel[b]['float']['median']:.2f})")
            ort_best = min((v["median"] for k, v in duel[b].items() if k.startswith("ort-")), default=None)
            vs_ort.append(f"{med / ort_best:.2f}" if ort_best and not name.startswith("ort-") and name != "float"
                          else "-")
        rows.append("| " + " | ".join([name, *cells, *vs_ort]) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- tables


def fidelity_columns(subject: Subject, labels: bool) -> list[tuple[str, str, str]]:
    """(header, key in fidelity, format) per subject."""
    if subject.kind == "embedding":
        return [("cos mean", "cos_mean", ".4f"), ("cos min", "cos_min", ".4f"), ("SQNR dB", "sqnr_db", ".1f")]
    cols = [("acc %", "accuracy", ".2%")] if labels else []
    return cols + [("top-1 agree", "top1_agreement", ".2%"), ("SQNR dB", "sqnr_db", ".1f")]


def _pct(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec).replace("%", "")  # the header carries the unit


def latency_cell(evaluation: dict, batch: str) -> str:
    """Median ms at ``batch``, with the ratio to the float model timed beside it."""
    value = evaluation.get("latency_ms", {}).get(batch)
    ratio = evaluation.get("latency_vs_float", {}).get(batch)
    return "-" if value is None else f"{value:.3g}" + (f" ({ratio:.2f})" if ratio is not None else "")


def rss_cell(m: Measurement | None) -> str:
    """Peak RSS in MB; ">=" when the RSS ceiling stopped the process (its real peak was higher)."""
    if m is None:
        return "-"
    return (">=" if m.rss_limited else "") + f"{m.peak_rss_bytes / MB:.0f}"


def float_weights(mod: dict) -> str:
    """Float weight MB left in the file, with the part no node uses."""
    if not mod:
        return "-"
    text = f"{mod['float_weight_bytes'] / MB:.2f}"
    if mod.get("float_unused_bytes"):
        text += f" ({mod['float_unused_bytes'] / MB:.2f} unused)"
    return text


def table(subject: Subject, results: Sequence[Result], labels: bool) -> str:
    cols = fidelity_columns(subject, labels)
    head = ["contender", "calib", "status", "quant s", "peak RSS MB", *[c[0] for c in cols],
            "b1 ms (x float)", "b8 ms (x float)", "file MB", "float weights MB", "Q/DQ", "lint"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in results:
        m, e = r.measurement, r.evaluation or {}
        fid, mod = e.get("fidelity", {}), e.get("model", {})


        lint_count = (r.lint or {}).get("violations")
        cells = [
            r.name, "-" if r.calib_samples is None else str(r.calib_samples), r.status,
            fmt(m.wall_s if m and r.name != "float" else None, ".1f"),
            rss_cell(m) if r.name != "float" else "-",
            *[_pct(fid.get(key), spec) for _, key, spec in cols],
            latency_cell(e, "1"), latency_cell(e, "8"),
            fmt(mod["file_bytes"] / MB if mod else None, ".2f"),
            float_weights(mod),
            f"{mod['quantize_linear']}/{mod['dequantize_linear']}" if mod else "-",
            "-" if lint_count is None else str(lint_count),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scaling_table(results: Sequence[Result]) -> str | None:
    """Peak RSS per contender at each calibration size (the RSS-flatness check)."""
    sizes = sorted({r.calib_samples for r in results if r.calib_samples is not None})
    if len(sizes) < 2:
        return None
    names = list(dict.fromkeys(r.name for r in results if r.calib_samples is not None))
    head = ["contender", *[f"RSS MB @{n}" for n in sizes], *[f"quant s @{n}" for n in sizes],
            f"RSS {sizes[-1]}/{sizes[0]}"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        by = {r.calib_samples: r for r in results if r.name == name}
        rss = [by[n].measurement.peak_rss_bytes if n in by and by[n].measurement else None for n in sizes]
        wall = [by[n].measurement.wall_s if n in by and by[n].measurement else None for n in sizes]
        ratio = rss[-1] / rss[0] if rss[0] and rss[-1] else None
        limited = any(by[n].measurement.rss_limited for n in sizes if n in by and by[n].measurement)
        status = {by[n].status for n in sizes if n in by} - {"ok"}
        rows.append("| " + " | ".join([name + (f" ({', '.join(sorted(status))})" if status else ""),
                                       *[rss_cell(by[n].measurement if n in by else None) for n in sizes],
                                       *[fmt(v, ".1f") for v in wall],
                                       (">=" if limited else "") + fmt(ratio, ".2f")]) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def child_main(argv: Sequence[str]) -> int:
    import _quant_children as kids

    p = argparse.ArgumentParser(prog="quantize_compare.py _child")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("subject", choices=SUBJECTS)
    prep.add_argument("work", type=Path)
    prep.add_argument("--calib-samples", type=int, nargs="+", required=True)
    prep.add_argument("--n-eval", type=int, required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("subject", choices=SUBJECTS)
    for name in ("model", "eval_npz", "ref_npz"):
        ref.add_argument(name, type=Path)
    ev = sub.add_parser("evaluate")
    ev.add_argument("subject", choices=SUBJECTS)
    for name in ("model", "eval_npz", "ref_npz", "out_json"):
        ev.add_argument(name, type=Path)
    ev.add_argument("--labels", type=Path)
    ev.add_argument("--runs", type=int, default=30)
    ev.add_argument("--warmup", type=int, default=5)
    ev.add_argument("--float-model", type=Path)
    ev.add_argument("--seconds", type=float, default=1.0)
    lat = sub.add_parser("latency")
    lat.add_argument("models", nargs="+", help="name=path.onnx")
    lat.add_argument("--eval-npz", type=Path, required=True)
    lat.add_argument("--out-json", type=Path, required=True)
    lat.add_argument("--runs", type=int, default=30)
    lat.add_argument("--warmup", type=int, default=5)
    lat.add_argument("--seconds", type=float, default=2.0)
    for name in ("quantize-ort", "quantize-onnxsim"):
        q = sub.add_parser(name)
        for arg in ("model", "out", "calib"):
            q.add_argument(arg, type=Path)
        q.add_argument("--method", required=True)
        q.add_argument("--batch", type=int, default=1)
        q.add_argument("--report", type=Path, required=True)
        if name == "quantize-ort":
            q.add_argument("--variant", choices=("u8", "s8"), required=True)
        else:
            q.add_argument("--prep", choices=("simplify", "raw"), default="simplify")
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        kids.child_prepare(SUBJECTS[a.subject], a.work, a.calib_samples, a.n_eval)
    elif a.cmd == "reference":
        kids.child_reference(SUBJECTS[a.subject], a.model, a.eval_npz, a.ref_npz)
    elif a.cmd == "evaluate":
        kids.child_evaluate(SUBJECTS[a.subject], a.model, a.eval_npz, a.ref_npz, a.labels, a.out_json, a.runs,
                            a.warmup, a.float_model, a.seconds)
    elif a.cmd == "latency":
        models = dict(m.split("=", 1) for m in a.models)
        kids.child_latency({k: Path(v) for k, v in models.items()}, a.eval_npz, a.out_json, a.runs, a.warmup,
                           a.seconds)
    elif a.cmd == "quantize-ort":
        kids.child_quantize_ort(a.model, a.out, a.calib, a.method, a.variant, a.batch, a.report)
    else:
        kids.child_quantize_onnxsim(a.model, a.out, a.calib, a.method, a.batch, a.prep, a.report)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--calib-samples", type=int, nargs="+", default=[64],
                   help="calibration set size(s); several sizes run every contender at each (nested data)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluation samples (default: per subject)")
    p.add_argument("--contenders", nargs="+", default=["*"], help="fnmatch patterns, e.g. 'ort-*' 'onnxsim-mse'")
    p.add_argument("--calib-batch", type=int, default=1, help="samples per calibration batch fed to the peers")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--latency-warmup", type=int, default=5)
    p.add_argument("--latency-seconds", type=float, default=1.0,
                   help="keep timing each model until this many seconds of its runs were timed (per batch size)")
    p.add_argument("--timeout", type=float, default=1800, help="per-contender limit in seconds")
    p.add_argument("--rss-limit-gb", type=float, default=18.0,
                   help="kill a contender whose process group holds more resident memory (GB = 1e9 bytes)")
    p.add_argument("--ogt-command", default=OGT_QUANTIZE, help="template; {model} {out} {npz} {method} {target}")
    p.add_argument("--lint-command", default=OGT_LINT, help="template; {model}")
    p.add_argument("--bin-dir", type=Path, default=Path(sys.executable).parent)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep-outputs", action="store_true")
    return p.parse_args(argv)


def prepare_subject(subject: Subject, args: argparse.Namespace, sdir: Path) -> dict:
    sdir.mkdir(parents=True, exist_ok=True)
    n_eval = args.n_eval or subject.n_eval
    m = run_child(["prepare", subject.name, sdir, "--calib-samples", *args.calib_samples, "--n-eval", n_eval],
                  sdir, sdir / "prepare.log")
    if m.returncode != 0:
        raise RuntimeError(f"{subject.name}: preparing data failed:\n{tail(sdir / 'prepare.log')}")
    info = json.loads((sdir / "prepare.json").read_text())
    m = run_child(["reference", subject.name, info["model"], sdir / "eval.npz", sdir / "ref.npz"], sdir,
                  sdir / "reference.log")
    if m.returncode != 0:
        raise RuntimeError(f"{subject.name}: float reference failed:\n{tail(sdir / 'reference.log')}")
    return info


def run_subject(subject: Subject, args: argparse.Namespace, selected: list[Contender], ogt_ok: bool,
                lint_ok: bool, report: dict, save) -> list[Result]:
    sdir = args.work_dir / "quantize" / subject.name
    info = prepare_subject(subject, args, sdir)
    report["subjects"][subject.name] = {"prepare": info, "fidelity_output": subject.output}
    model = Path(info["model"])
    results: list[Result] = []
    float_dir = sdir / "float"
    float_dir.mkdir(exist_ok=True)
    ev, err = evaluate(subject, model, sdir, float_dir, args)
    results.append(Result(subject.name, None, "float", "float", "the float model", [str(model)],
                          "ok" if ev else "failed", evaluation=ev, error_tail=err,
                          lint=lint(model, args.lint_command, args.bin_dir, float_dir) if lint_ok else None))
    ev_ = ev or {}
    print(f"[{subject.name}] float: {json.dumps(ev_.get('fidelity'))} {json.dumps(ev_.get('latency_ms'))}", flush=True)
    for n in args.calib_samples:
        for c in selected:
            if c.family == "ogt" and not ogt_ok:
                results.append(Result(subject.name, n, c.name, c.family, c.tool,
                                      c.command(model=model, out="OUT", npz=f"calib_{n}.npz", batch="",
                                                report=""), "not available"))
                continue
            print(f"[{subject.name} c{n}] {c.name} ...", flush=True)
            r = bench_one(c, subject, model, sdir, n, args, lint_ok)
            results.append(r)
            m = r.measurement
            print(f"[{subject.name} c{n}] {c.name}: {r.status}, {fmt(m.wall_s if m else None, '.1f')} s, "
                  f"{fmt(m.peak_rss_bytes / MB if m else None, '.0f')} MB, "
                  f"{json.dumps((r.evaluation or {}).get('fidelity'))}", flush=True)
            report["results"] = [asdict(x) for x in report["_all"] + results]
            save()
        duel = latency_duel(subject, model, sdir, n, results, args)
        if duel is not None:
            report["subjects"][subject.name].setdefault("latency_duel", {})[str(n)] = duel
            save()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    args.calib_samples = sorted(set(args.calib_samples))
    ogt_ok = ogt_command_works(args.ogt_command, args.bin_dir)
    lint_ok = ogt_command_works(args.lint_command, args.bin_dir)
    print(f"ogt quantize: {'available' if ogt_ok else 'not available'}; "
          f"ogt lint: {'available' if lint_ok else 'not available'}", flush=True)
    selected = [c for c in contenders(args.ogt_command) if any(fnmatch.fnmatch(c.name, p) for p in args.contenders)]
    selected += [c for c in extra_contenders() if c.name in args.contenders]
    tag = "+".join(args.subjects) + "_c" + "-".join(map(str, args.calib_samples))
    json_path = args.json or args.work_dir / f"quantize_compare_{tag}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "benchmark": "quantize_compare",
        "argv": argv,
        "machine": machine_info(PACKAGES),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ogt_available": ogt_ok,
        "lint_available": lint_ok,
        "subjects": {},
        "_all": [],
    }

    def save() -> None:
        json_path.write_text(json.dumps({k: v for k, v in report.items() if k != "_all"}, indent=2,
                                        default=_json_default))

    tables = []
    for name in args.subjects:
        subject = SUBJECTS[name]
        try:
            results = run_subject(subject, args, selected, ogt_ok, lint_ok, report, save)
        except RuntimeError as exc:
            print(f"[{name}] {exc}", file=sys.stderr, flush=True)
            report["subjects"].setdefault(name, {})["error"] = str(exc)
            continue
        report["_all"] += results
        report["results"] = [asdict(x) for x in report["_all"]]
        save()
        labels = report["subjects"][name]["prepare"]["labels"]
        text = f"## {name}\n\n{table(subject, results, labels)}"
        for n, duel in report["subjects"][name].get("latency_duel", {}).items():
            text += (f"\n\nLatency head to head (c{n}: float, ogt --target ort and onnxruntime u8 outputs "
                     f"alternated in one process):\n\n{duel_table(duel)}")
        scaling = scaling_table(results)
        if scaling:
            text += f"\n\nPeak RSS against calibration-set size:\n\n{scaling}"
        notes = sorted({f"{r.name.rsplit('-', 1)[0] if r.family == 'ort' else r.name}: {note}" for r in results
                        for note in (r.tool_report or {}).get("notes", [])})
        if notes:
            text += "\n\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes)
        errors = [f"{r.name} c{r.calib_samples} ({r.status}):\n```\n{r.error_tail}\n```" for r in results
                  if r.error_tail]
        if errors:
            text += "\n\nFailures, last lines of output:\n\n" + "\n\n".join(errors)
        tables.append(text)
    save()
    print()
    print(f"machine: {json.dumps(report['machine'])}")
    print("\n\n".join(tables))
    print("\nquant s / peak RSS: the contender's own process (wall time, GNU time %M); latency: onnxruntime CPU, "
          "default session options but idle threads not spinning (so sessions alternated in one process do not steal "
          "each other's cores), median, timed interleaved with the float model in one process "
          "(x float = ratio of the two medians); float weights: float tensors >= 1024 elements left in the file "
          "(unused: consumed by no node); Q/DQ: QuantizeLinear/DequantizeLinear nodes; lint: ogt lint --target "
          "tensorrt violations.")
    print(f"\nJSON: {json_path}")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


if __name__ == "__main__":
    sys.exit(main())
