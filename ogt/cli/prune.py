"""``ogt prune``: fold-batchnorm, cleanup, prune-nm (optionally calibrated), optionally pack-nm."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..graph.io import atomic_file, load, save
from ..transforms import Cleanup, FoldBatchNorm, Pipeline
from ..transforms.pack_nm import PackNM
from ..transforms.prune_nm import PruneNM, collect_norms
from .main import (
    _calibration_options,
    _output_options,
    calibration_source,
    check_writable,
    cli,
    resolve_output,
)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model (default: <model>.sparse.onnx).")
@click.option("--n", "n", type=click.IntRange(min=1), default=2, show_default=True, help="Keep at most N non-zeros ...")
@click.option("--m", "m", type=click.IntRange(min=2), default=4, show_default=True, help="... in every M consecutive weights.")
@click.option("--criterion", type=click.Choice(["magnitude", "activation"]), default="magnitude", show_default=True,
              help="magnitude: |W|; activation: |W| x input-channel L2 norm on calibration data (Wanda).")
@_calibration_options
@click.option("--target", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True,
              help="tensorrt: MatMul with a pruned constant weight becomes Gemm(transB=1).")
@click.option("--min-channels", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip layers with fewer input or output channels.")
@click.option("--exclude", multiple=True, help="Leave dense: glob on node name or op type; repeatable.")
@click.option("--pack", is_flag=True, help="Then pack 2:4 MatMul/Gemm weights into ai.ogt::Sparse24MatMul.")
@click.option("--no-fold", is_flag=True, help="Do not run fold-batchnorm and cleanup first.")
@click.option("--report", type=click.Path(path_type=Path), help="Write what each step did as JSON.")
@click.option("--quiet", is_flag=True, help="No summary.")
@_output_options
def prune(model, output, n, m, criterion, calib_data, synthetic, input_shape, int_range, calib_samples, batch_size,
          target, min_channels, exclude, pack, no_fold, report, quiet, overwrite, external_data,
          external_data_threshold, external_data_location):
    """Prune MODEL's Conv/MatMul/Gemm weights to N:M sparsity (default 2:4) along the reduction axis."""
    from ..calib import data as cdata

    if n >= m:
        raise click.UsageError(f"--n must be smaller than --m (got {n}:{m})")
    has_data = calib_data is not None or synthetic is not None
    if criterion == "activation" and (calib_data is None) == (synthetic is None):
        raise click.UsageError("--criterion activation needs exactly one of --calib-data PATH or --synthetic N")
    if criterion == "magnitude" and has_data:
        raise click.UsageError("--calib-data / --synthetic are used only by --criterion activation")
    if pack and target == "tensorrt":
        raise click.UsageError("--pack writes ai.ogt custom ops, which TensorRT cannot run; use --target ort to pack")
    if pack and (n, m) != (2, 4):
        raise click.UsageError("--pack stores 2:4 patterns only")
    out = resolve_output(model, output, "sparse", overwrite)
    if report is not None:
        check_writable(report, "report", avoid=[model, out])
    g = load(model)
    steps = []
    if not no_fold:
        res = Pipeline([FoldBatchNorm(), Cleanup()])(g)
        g = res.graph
        steps.extend(res.children)
    norms = None
    if criterion == "activation":
        source = cdata.checked(g, calibration_source(g, calib_data, synthetic, input_shape, int_range, calib_samples, batch_size))
        norms = collect_norms(g, source, m)
    res = PruneNM(n=n, m=m, criterion=criterion, norms=norms, exclude=tuple(exclude), min_channels=min_channels,
                  target=target)(g)
    g = res.graph
    steps.append(res)
    if pack:
        res = PackNM(exclude=tuple(exclude))(g)
        g = res.graph
        steps.append(res)
    save(g, out, external_data=external_data, size_threshold=external_data_threshold, location=external_data_location)
    if report is not None:
        payload = {"input": str(model), "output": str(out), "criterion": criterion, "n": n, "m": m, "target": target,
                   "calibration_samples": norms.samples if norms is not None else 0,
                   "steps": [s.as_dict() for s in steps]}
        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(payload, indent=1) + "\n")
    if not quiet:
        for step in steps:
            counts = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in step.counts.items()) or "no change"
            click.echo(f"{step.name:<16} {counts}  ({step.seconds:.2f}s)")
            if step.name in ("prune-nm", "pack-nm"):
                for s in step.skipped[:10]:
                    click.echo(f"  skipped {s.op_type} '{s.node}': {s.reason}")
                if len(step.skipped) > 10:
                    click.echo(f"  ... {len(step.skipped) - 10} more skipped (--report lists them)")
    click.echo(f"wrote {out}")
