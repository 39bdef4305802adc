"""ogt: ONNX-to-ONNX graph transformations for model compression.

>>> import ogt
>>> model = ogt.load("model.onnx")
>>> result = ogt.Pipeline([ogt.FoldBatchNorm(), ogt.Cleanup()])(model)
>>> ogt.save(result.graph, "model.folded.onnx")
"""

from .errors import (
    CalibrationError,
    InvalidGraphError,
    InvalidModelError,
    OgtError,
    TransformError,
    UnsafeModelError,
)
from .graph import Model, load, save
from .transforms import (
    Cleanup,
    FoldBatchNorm,
    FoldConstants,
    FoldShapes,
    MigrateGamma,
    Pipeline,
    Skip,
    SmoothQuant,
    Transform,
    TransformContext,
    TransformResult,
    available,
    create,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "Cleanup",
    "FoldBatchNorm",
    "FoldConstants",
    "FoldShapes",
    "InvalidGraphError",
    "InvalidModelError",
    "MigrateGamma",
    "Model",
    "OgtError",
    "Pipeline",
    "Skip",
    "SmoothQuant",
    "Transform",
    "TransformContext",
    "TransformError",
    "TransformResult",
    "UnsafeModelError",
    "available",
    "create",
    "load",
    "register",
    "save",
]
