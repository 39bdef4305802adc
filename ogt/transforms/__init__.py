"""Transforms, one family per module, registered by kebab-case name."""

from ._base import Pipeline, Skip, Transform, TransformContext, TransformResult, available, create, register
from .cleanup import Cleanup
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_shapes import FoldShapes
from .pack_nm import PackNM
from .prune_nm import PruneNM
from .migrate_gamma import MigrateGamma
from .smoothquant import SmoothQuant

__all__ = [
    "Cleanup",
    "FoldBatchNorm",
    "FoldConstants",
    "FoldShapes",
    "PackNM",
    "MigrateGamma",
    "SmoothQuant",
    "Pipeline",
    "PruneNM",
    "Skip",
    "Transform",
    "TransformContext",
    "TransformResult",
    "available",
    "create",
    "register",
]
