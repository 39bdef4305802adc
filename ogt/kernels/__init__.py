"""Custom ops in ogt's own domain (``ai.ogt``): schema, numpy reference kernel, runtime kernels.

``Sparse24MatMul`` (:mod:`ogt.kernels.sparse24`): a MatMul whose 2:4-sparse weight is stored as
kept values plus 2-bit positions (layout in that module). Kernels:

- numpy reference, for ``onnx.reference.ReferenceEvaluator(model, new_ops=[Sparse24MatMul])``;
- onnxruntime CPU, through onnxruntime-extensions (:mod:`ogt.kernels.ort`, extra ``kernels``);
- GPU, a Triton kernel (:mod:`ogt.kernels.gpu`; needs CUDA, torch and triton, imported lazily).
"""

from .sparse24 import (
    DOMAIN,
    OP_TYPE,
    Sparse24MatMul,
    pack,
    register_schema,
    sparse24_matmul,
    unpack,
)

register_schema()

__all__ = ["DOMAIN", "OP_TYPE", "Sparse24MatMul", "pack", "register_schema", "sparse24_matmul", "unpack"]
