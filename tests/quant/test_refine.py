"""Layer-wise range refinement: never worse than the method on its own samples; only weighted-layer inputs move."""

from __future__ import annotations

import numpy as np
import pytest

import ogt
from ogt.calib.data import iterable_source
from ogt.quant.quantize import QuantizeOptions, quantize
from ogt.quant.refine import RefineOptions


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_refine_keeps_or_lowers_each_layer_error(demo_path, target):
    rng = np.random.default_rng(0)
    m = ogt.load(demo_path)
    name = m.graph.input[0].name
    batches = [{name: rng.normal(size=(4, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    options = QuantizeOptions(target=target, progress=False, placement="weighted", method="minmax", refine=True,
                              refine_options=RefineOptions(samples=4, grid=6, bisections=2))
    result = quantize(m, iterable_source(batches), options)
    assert result.refined
    for r in result.refined:
        assert r.error_after <= r.error_before
        assert result.table.ranges[r.tensor].lo == r.lo and result.table.ranges[r.tensor].hi == r.hi
    assert result.table.method == "minmax+refine"
    assert "refined" in result.as_dict()
