"""``ogt`` entry point: one error funnel, exit codes from ogt.errors, no traceback unless --debug."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from .. import __version__
from ..errors import OgtError, OutputError
from ..graph.io import DEFAULT_SIZE_THRESHOLD, atomic_file, load, save
from ..inspect import format_summary, summarize
from ..transforms import Pipeline, TransformContext, available, create

INTERNAL_ERROR = 70


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OgtError as exc:
            _report(ctx, f"error: {exc}")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - last-resort funnel for the CLI only
            _report(ctx, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
            ctx.exit(INTERNAL_ERROR)


def _report(ctx: click.Context, message: str) -> None:
    if ctx.params.get("debug") or os.environ.get("OGT_DEBUG"):
        traceback.print_exc()
    click.echo(message, err=True)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="ogt")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """ONNX-to-ONNX graph transformations for model compression."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _calibration_options(f):
    """The calibration-data options every command that reads data shares (quantize, prune)."""
    for decorator in reversed([
        click.option("--calib-data", type=click.Path(path_type=Path), help=".npz / .npy file, or a folder of them or of images."),
        click.option("--synthetic", type=click.IntRange(min=1), help="N random samples from the input spec."),
        click.option("--input-shape", multiple=True, help="Shape of a dynamic input for --synthetic: name:1x3x224x224."),
        click.option("--int-range", multiple=True, help="Range of an integer input for --synthetic: name:LO,HI."),
        click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most N calibration samples."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Samples per onnxruntime run (default: 1 read at a time; quantize batches them by "
                          "itself within a memory budget when the model takes any batch size)."),
    ]):
        f = decorator(f)
    return f


def calibration_source(model, calib_data, synthetic, input_shape, int_range, calib_samples, batch_size):
    """The CalibrationSource the shared options describe, for ``model``."""
    from ..calib import data as cdata

    batch_size = batch_size or 1
    if synthetic is not None:
        source = cdata.synthetic_source(model, synthetic, input_shapes=cdata.parse_input_shapes(input_shape),
                                        int_ranges=_parse_int_ranges(int_range), batch_size=batch_size)
    else:
        source = cdata.open_source(calib_data, model, batch_size=batch_size)
    return cdata.limit(source, calib_samples) if calib_samples is not None else source


def _output_options(f):
    f = click.option("--overwrite", is_flag=True, help="Allow writing over the input model.")(f)
    f = click.option(
        "--external-data/--no-external-data",
        default=None,
        help="Keep tensors in a separate data file (default: when the input did or the model exceeds 2 GB).",
    )(f)
    f = click.option(
        "--external-data-threshold",
        type=click.IntRange(min=0),
        default=DEFAULT_SIZE_THRESHOLD,
        show_default=True,
        help="Tensors of at least this many bytes go to the data file.",
    )(f)
    f = click.option("--external-data-location", default=None, help="Data file name (default: <output>.data).")(f)
    return f


def resolve_output(model_path: Path, output: Path | None, suffix: str, overwrite: bool) -> Path:
    """The output path; never the input unless ``overwrite``."""
    out = output if output is not None else model_path.with_name(f"{model_path.stem}.{suffix}{model_path.suffix}")
    if out.exists() and out.resolve() == model_path.resolve() and not overwrite:
        raise OutputError(f"{out} is the input model; pass --overwrite to replace it")
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a file name for the output")
    return out


def check_writable(path: Path, what: str, avoid: list[Path]) -> None:
    """Fail before any work if ``path`` cannot be written or would replace an input/output."""
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} for the {what} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    if any(path.resolve() == p.resolve() for p in avoid):
        raise OutputError(f"{path}: the {what} would overwrite the model")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model (default: <model>.transformed.onnx).")
@click.option(
    "-t",
    "--transform",
    "names",
    multiple=True,
    required=True,
    type=click.Choice(available()),
    help="Transform to run, in order; repeatable.",
)
@click.option("--report", type=click.Path(path_type=Path), help="Write what each transform did as JSON.")
@click.option("--no-validate", is_flag=True, help="Skip graph validation after each transform.")
@_output_options
def transform(model, output, names, report, no_validate, overwrite, external_data, external_data_threshold, external_data_location):
    """Run transforms on MODEL and write the result."""
    pipeline = Pipeline([create(n) for n in names])
    out = resolve_output(model, output, "transformed", overwrite)
    if report is not None:
        check_writable(report, "report", avoid=[model, out])
    m = load(model)
    result = pipeline(m, TransformContext(validate=not no_validate))
    save(
        result.graph,
        out,
        external_data=external_data,
        size_threshold=external_data_threshold,
        location=external_data_location,
    )
    if report is not None:
        payload = {"input": str(model), "output": str(out), **result.as_dict()}
        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
    for step in result.children:
        counts = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in step.counts.items()) or "no change"
        click.echo(f"{step.name:<16} {counts}  ({step.seconds:.2f}s)")
        for s in step.skipped:
            click.echo(f"  skipped {s.op_type} '{s.node}': {s.reason}")
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--sparsity", "sparsity_detail", is_flag=True, help="List every weight's 2:4 sparsity and eligibility.")
def inspect(model, as_json, sparsity_detail):
    """Summarise MODEL: versions, I/O, ops, parameters, BN / LayerNorm / Q-DQ counts, external data, 2:4 sparsity."""
    summary = summarize(load(model))
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo(format_summary(summary, sparsity_detail=sparsity_detail))


def _parse_int_ranges(specs: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    out = {}
    for spec in specs:
        name, _, rest = spec.rpartition(":")
        lo, _, hi = rest.partition(",")
        try:
            out[name] = (int(lo), int(hi))
        except ValueError:
            raise click.BadParameter(f"'{spec}': expected NAME:LO,HI (integers, HI exclusive)", param_hint="--int-range") from None
        if not name or out[name][0] >= out[name][1]:
            raise click.BadParameter(f"'{spec}': expected NAME:LO,HI with LO < HI", param_hint="--int-range")
    return out


def _load_recipe(path: Path | None):
    from ..errors import CalibrationError
    from ..quant.insert_qdq import TensorOverride

    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return {name: TensorOverride(**entry) for name, entry in data.get("tensors", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CalibrationError(f"{path}: not a valid recipe ({exc}); expected {{\"tensors\": {{name: {{bits|lo|hi|skip}}}}}}") from None


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model (default: <model>.quant.onnx).")
@_calibration_options
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse", "token-clip"]), default="minmax",
              show_default=True, help="token-clip: Outlier Suppression's token-wise clipping (coarse alpha search + layer-wise refinement).")
@click.option("--percentile", type=click.FloatRange(50, 100), default=None, help="Percentile for --method percentile.")
@click.option("--coverage", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="--method entropy: never clip more than 1-COVERAGE of a tensor's values (default 0.999; 0 = TensorRT's unbounded search).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Subtract the mean output shift each weight's rounding causes from the layer's bias.")
@click.option("--migrate-gamma", is_flag=True, help="Run migrate-gamma before calibration (LayerNorm gamma into the next layers).")
@click.option("--smoothquant", "smoothquant", default=None, metavar="ALPHA|auto",
              help="Run smoothquant before calibration with this migration strength (0..1) or 'auto' (searched per layer).")
@click.option("--refine", is_flag=True, help="Search each weighted layer's input range on that layer's output error (slower).")
@click.option("--noisy-bias", is_flag=True, help="NoisyQuant: add searched fixed noise before the inputs of linear layers, "
              "removed exactly through their biases (kept per layer only where it lowers that layer's error).")
@click.option("--noisy-bias-include", multiple=True, metavar="GLOB",
              help="--noisy-bias only for linear layers matching GLOB (node name or op type); repeatable.")
@click.option("--noisy-bias-exclude", multiple=True, metavar="GLOB", help="--noisy-bias: skip linear layers matching GLOB; repeatable.")
@click.option("--target", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True)
@click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True)
@click.option("--act-bits", type=click.IntRange(2, 8), default=8, show_default=True)
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales instead of per channel.")
@click.option("--weight-method", type=click.Choice(["minmax", "mse"]), default=None,
              help="Each weight channel's range: its extremes, or the clipped range with the least squared error "
              "[default: mse below 8-bit weights, else minmax].")
@click.option("--int4", is_flag=True, help="Store tensors of <= 4 bits as INT4/UINT4 (opset 21; the model is converted).")
@click.option(
    "--placement",
    type=click.Choice(["auto", "full", "weighted"]),
    default="auto",
    show_default=True,
    help="full: Q/DQ on every quantizable op's inputs; weighted: only Conv/Gemm/MatMul; auto: full, minus op "
    "families whose Q/DQ cost more than 1 dB of output SQNR on the calibration data.",
)
@click.option("--exclude", multiple=True, help="Keep nodes float: glob on node name or op type; repeatable.")
@click.option("--recipe", type=click.Path(path_type=Path), help="JSON per-tensor overrides.")
@click.option("--report", type=click.Path(path_type=Path), help="Write scales and the per-layer error table as JSON.")
@click.option("--save-table", type=click.Path(path_type=Path), help="Write the calibration table as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@_output_options
def quantize(model, output, calib_data, synthetic, input_shape, int_range, calib_samples, batch_size, method, percentile,
             coverage, bias_correction, migrate_gamma, smoothquant, refine, noisy_bias, noisy_bias_include, noisy_bias_exclude, target, int4, weight_bits, act_bits,
             per_tensor, weight_method, placement, exclude, recipe, report, save_table, quiet, overwrite, external_data, external_data_threshold, external_data_location):
    """Quantize MODEL to QDQ: fold-batchnorm, cleanup, calibrate, insert-qdq; report fidelity."""
    from ..quant.noisy_bias import NoisyBiasOptions
    from ..quant.quantize import QuantizeOptions, quantize as run_quantize

    if (calib_data is None) == (synthetic is None):
        raise click.UsageError("give exactly one of --calib-data PATH or --synthetic N")
    out = resolve_output(model, output, "quant", overwrite)
    for path, what in ((report, "report"), (save_table, "calibration table")):
        if path is not None:
            check_writable(path, what, avoid=[model, out])
    options = QuantizeOptions(
        method=method, target=target, weight_bits=weight_bits, act_bits=act_bits, per_channel=not per_tensor,
        exclude=tuple(exclude), overrides=_load_recipe(recipe), placement=placement,
        observer_options=_observer_options(method, percentile, coverage), progress=not quiet,
        bias_correction=bias_correction, refine=refine, migrate_gamma=migrate_gamma,
        smoothquant=_smoothquant_alpha(smoothquant), int4=int4, noisy_bias=noisy_bias,
        noisy_bias_options=NoisyBiasOptions(include=tuple(noisy_bias_include) or ("*",), exclude=tuple(noisy_bias_exclude)),
        batch_size=batch_size, weight_method=weight_method,
    )
    if (noisy_bias_include or noisy_bias_exclude) and not noisy_bias:
        raise click.UsageError("--noisy-bias-include/--noisy-bias-exclude apply to --noisy-bias")
    m = load(model)
    source = calibration_source(m, calib_data, synthetic, input_shape, int_range, calib_samples, batch_size)
    result = run_quantize(m, source, options)
    save(result.model, out, external_data=external_data, size_threshold=external_data_threshold, location=external_data_location)
    if save_table is not None:
        result.table.save(save_table)
    if report is not None:
        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps({"input": str(model), "output": str(out), **result.as_dict()}, indent=1) + "\n")
    if not quiet:
        _print_quantize_summary(result)
    click.echo(f"wrote {out}")


def _smoothquant_alpha(value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise click.UsageError(f"--smoothquant takes a number in [0, 1] or 'auto', got {value!r}")
    return alpha


def _observer_options(method: str, percentile: float | None, coverage: float | None) -> dict:
    for value, flag, owner in ((percentile, "--percentile", "percentile"), (coverage, "--coverage", "entropy")):
        if value is not None and method != owner:
            raise click.UsageError(f"{flag} applies to --method {owner}, not --method {method}")
    if percentile is not None:
        return {"percentile": percentile}
    return {"coverage": coverage} if coverage is not None else {}


def _print_quantize_summary(result) -> None:
    counts = result.counts
    click.echo(
        f"quantized {counts.get('insert-qdq.weight', 0)} weighted layers, "
        f"{counts.get('insert-qdq.activation', 0)} activation tensors "
        f"({result.options.target}, W{result.options.weight_bits}A{result.options.act_bits}, {result.options.method}, "
        f"{result.table.samples} calibration samples)"
    )
    corrected = counts.get("correct-bias.corrected", 0)
    if corrected:
        click.echo(f"bias correction: {corrected} layers")
    if "token_clip" in result.extra:
        click.echo(f"token-clip: alpha {result.extra['token_clip']['alpha']} (lowest output MSE on the calibration data)")
    if "noisy_bias" in result.extra:
        rows = result.extra["noisy_bias"]
        kept = [r for r in rows if r["kept"]]
        extra_ops = sum(r["placement"] == "add" for r in kept) if result.options.target == "tensorrt" else 0
        click.echo(f"noisy bias: kept on {len(kept)} of {len(rows)} linear-layer inputs"
                   + (f" ({extra_ops} with an extra elementwise Add TensorRT cannot fold)" if extra_ops else ""))
    if result.refined:
        better = [r for r in result.refined if r.error_after < r.error_before]
        click.echo(f"refine: {len(better)} of {len(result.refined)} weighted-layer input ranges moved")
    if result.placement.get("kept_float"):
        click.echo("placement auto: kept float the inputs of " + ", ".join(result.placement["kept_float"])
                   + " (each cost more than 1 dB of output SQNR)")
    skipped = result.skipped
    if skipped:
        click.echo(f"skipped {len(skipped)}:")
        for s in skipped[:10]:
            click.echo(f"  {s.op_type} '{s.node}': {s.reason}")
        if len(skipped) > 10:
            click.echo(f"  ... {len(skipped) - 10} more in --report")
    worst = sorted(result.layers, key=lambda x: x.sqnr_db)[:5]
    if worst:
        click.echo("worst layers by SQNR: " + ", ".join(f"{x.node or x.output} {x.sqnr_db:.1f} dB" for x in worst))
    for o in result.outputs:
        click.echo(f"fidelity on calibration data: {o.name} SQNR {o.sqnr_db:.1f} dB, cosine mean {o.cosine_mean:.4f} min {o.cosine_min:.4f}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lint(model, target, as_json):
    """Check a QDQ model against TARGET's quantization rules; exit 12 when violations exist."""
    from ..errors import LintError
    from ..export.tensorrt_lint import lint_tensorrt

    violations = lint_tensorrt(load(model))
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in violations], indent=2))
    else:
        for v in violations:
            click.echo(f"{v.rule:<22} {v.node}: {v.message}")
        click.echo(f"{len(violations)} violation(s) of TensorRT rules" if violations else "no violations")
    if violations:
        raise LintError(f"{model}: {len(violations)} violation(s) of {target} rules")


@cli.command("transforms")
def list_transforms():
    """List the registered transforms."""
    for name in available():
        doc = (create(name).__class__.__doc__ or "").strip().splitlines()
        click.echo(f"{name:<16} {doc[0] if doc else ''}")


from . import prune as _prune  # noqa: E402,F401 - registers `ogt prune` on the group above


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ogt")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
