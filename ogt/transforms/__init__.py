"""Transforms, one family per module, registered by kebab-case name."""

from ._base import Pipeline, Skip, Transform, TransformContext, TransformResult, available, create, register
from .cleanup import Cleanup
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants

__all__ = [
    "Cleanup",
    "FoldBatchNorm",
    "FoldConstants",
    "Pipeline",
    "Skip",
    "Transform",
    "TransformContext",
    "TransformResult",
    "available",
    "create",
    "register",
]
