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
    if any(path.resolve() == p.resolve() for p in avoid if p.exists() or p == avoid[-1]):
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
def inspect(model, as_json):
    """Summarise MODEL: versions, I/O, ops, parameters, BN / LayerNorm / Q-DQ counts, external data."""
    summary = summarize(load(model))
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo(format_summary(summary))


@cli.command("transforms")
def list_transforms():
    """List the registered transforms."""
    for name in available():
        doc = (create(name).__class__.__doc__ or "").strip().splitlines()
        click.echo(f"{name:<16} {doc[0] if doc else ''}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ogt")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
