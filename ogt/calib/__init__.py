"""Calibration: data sources, streaming observers, collection through onnxruntime, qparams, tables.

Calibration is an analysis, not a transform: ``calibrate(model, source, method=...)`` returns a
CalibrationTable that transforms such as insert-qdq take in their constructor.
"""

from .collect import calibrate
from .table import CalibrationTable, TensorRange

__all__ = ["CalibrationTable", "TensorRange", "calibrate"]
