"""Transform framework: registry, Pipeline, TransformResult contract, validation, instruments."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx
import pytest

import ogt
from ogt.transforms import TransformContext, TransformResult


def demo(demo_path) -> ogt.Model:
    return ogt.load(demo_path)


def test_registry_shares_names_with_the_cli():
    assert {"cleanup", "fold-batchnorm", "fold-constants"} <= set(ogt.available())
    assert isinstance(ogt.create("fold-batchnorm"), ogt.FoldBatchNorm)
    with pytest.raises(ogt.OgtError, match="unknown transform 'nope'"):
        ogt.create("nope")


def test_register_rejects_bad_names():
    @dataclasses.dataclass(frozen=True)
    class Bad(ogt.Transform):
        name: ClassVar[str] = "Bad_Name"

        def apply(self, model, ctx):
            return TransformResult(model, False)

    with pytest.raises(ValueError, match="kebab-case"):
        ogt.register(Bad)


def test_pipeline_merges_counts_and_keeps_steps(demo_path):
    result = ogt.Pipeline(["fold-batchnorm", "cleanup"])(demo(demo_path))
    assert [c.name for c in result.children] == ["fold-batchnorm", "cleanup"]
    merged = {**result.children[0].counts, **result.children[1].counts}
    assert result.counts == merged
    assert result.changed
    report = result.as_dict()
    assert report["steps"][0]["counts"]["fold-batchnorm.conv"] == 3
    assert all(step["seconds"] >= 0 for step in report["steps"])


def test_pipelines_nest(demo_path):
    inner = ogt.Pipeline([ogt.FoldBatchNorm()])
    result = ogt.Pipeline([inner, ogt.Cleanup()])(demo(demo_path))
    assert result.counts["fold-batchnorm.conv"] == 3


@dataclasses.dataclass(frozen=True)
class _Explodes(ogt.Transform):
    name: ClassVar[str] = "explodes"

    def apply(self, model, ctx):
        raise RuntimeError("boom")


def test_pipeline_failure_names_the_transform_and_what_ran_before(demo_path):
    with pytest.raises(ogt.TransformError) as info:
        ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup(), _Explodes()])(demo(demo_path))
    msg = str(info.value)
    assert "transform 'explodes' failed after fold-batchnorm, cleanup" in msg and "boom" in msg


@dataclasses.dataclass(frozen=True)
class _Breaks(ogt.Transform):
    name: ClassVar[str] = "breaks"

    def apply(self, model, ctx):
        model.graph.node[0].input[0] = "nowhere"
        return TransformResult(model, True)


def test_invalid_result_is_caught_by_validation(demo_path):
    with pytest.raises(ogt.TransformError, match="'breaks' produced an invalid graph.*'nowhere'"):
        _Breaks()(demo(demo_path))
    result = _Breaks()(demo(demo_path), TransformContext(validate=False))
    assert result.changed


@dataclasses.dataclass(frozen=True)
class _WrongReturn(ogt.Transform):
    name: ClassVar[str] = "wrong-return"

    def apply(self, model, ctx):
        return model


def test_apply_must_return_a_transform_result(demo_path):
    with pytest.raises(ogt.TransformError, match="returned Model, not TransformResult"):
        _WrongReturn()(demo(demo_path))


def test_transform_rejects_raw_protos(demo_path):
    with pytest.raises(TypeError, match="expected ogt.Model"):
        ogt.FoldBatchNorm()(onnx.load(demo_path))


def test_options_are_frozen():
    t = ogt.FoldBatchNorm(lower_unfoldable=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.lower_unfoldable = True


def test_lowering_can_be_disabled(demo_path):
    result = ogt.FoldBatchNorm(lower_unfoldable=False)(demo(demo_path))
    assert "fold-batchnorm.mul-add" not in result.counts
    assert any("lowering disabled" in s.reason for s in result.skipped)


class _Recorder:
    def __init__(self):
        self.events = []

    def before(self, transform, model):
        self.events.append(("before", transform.name))

    def after(self, transform, result):
        self.events.append(("after", transform.name, result.changed))


def test_instruments_see_every_transform(demo_path):
    rec = _Recorder()
    ogt.Pipeline(["fold-batchnorm", "cleanup"])(demo(demo_path), TransformContext(instruments=[rec]))
    assert rec.events == [
        ("before", "pipeline"),
        ("before", "fold-batchnorm"),
        ("after", "fold-batchnorm", True),
        ("before", "cleanup"),
        ("after", "cleanup", True),
        ("after", "pipeline", True),
    ]


def test_unchanged_graph_exports_to_the_same_bytes(demo_path, tmp_path):
    m = demo(demo_path)
    ogt.Pipeline(["fold-batchnorm", "cleanup"])(m)
    ogt.save(m, tmp_path / "a.onnx")
    again = ogt.Pipeline(["fold-constants", "fold-batchnorm", "cleanup"])(m)
    assert not again.changed
    ogt.save(m, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
