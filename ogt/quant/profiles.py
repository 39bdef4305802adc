"""Target profiles: every runtime-dependent quantization choice lives here, one object per target.

``ort``: what onnxruntime's CPU execution provider fuses into integer kernels. Activations are
uint8 asymmetric (measured here: only uint8-activation QDQ beats float on CPU; symmetric int8
activations run at 0.6-0.8x of float), weights int8 symmetric per channel, biases int32 with
``scale = s_x * s_w`` (the form ORT's QLinearConv/QGemm fusion expects).

``tensorrt``: TensorRT's explicit-quantization rules. Activations and weights int8 with zero
point 0, weights per channel on the output-channel axis, biases left float (no int32 tensors),
Q/DQ on both inputs of residual Adds, one shared scale for all inputs of a Concat, and Q/DQ only
in front of ops TensorRT can run in int8.

Both place Q/DQ on the *inputs* of quantizable ops (never between a Conv and its Relu/Clip:
those are fusion points, the Q after the activation absorbs it).
"""

from __future__ import annotations

import dataclasses

from ..calib.qparams import QScheme

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    act_signed: bool
    act_symmetric: bool
    quantized_bias: bool
    share_concat_scale: bool
    #: non-weighted ops whose activation inputs get Q/DQ
    activation_ops: frozenset[str]
    #: ops TensorRT/ORT run in float: a Q/DQ feeding them is a lint violation (tensorrt)
    float_only_ops: frozenset[str] = frozenset()

    def act_scheme(self, bits: int) -> QScheme:
        return QScheme(bits=bits, signed=self.act_signed, symmetric=self.act_symmetric, narrow=self.act_symmetric)

    def weight_scheme(self, bits: int, axis: int | None) -> QScheme:
        return QScheme(bits=bits, signed=True, symmetric=True, narrow=True, axis=axis)


_CNN_OPS = frozenset({"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Mul"})
_MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize"})
_FLOAT_ONLY = frozenset(
    {"Softmax", "LayerNormalization", "Sigmoid", "Tanh", "Exp", "Log", "Div", "Pow", "Sqrt", "Erf", "ReduceMean",
     "ReduceSum", "Gelu", "HardSigmoid", "HardSwish", "InstanceNormalization", "BatchNormalization", "Cast"}
)

ORT = TargetProfile(
    name="ort",
    act_signed=False,
    act_symmetric=False,
    quantized_bias=True,
    share_concat_scale=False,
    activation_ops=_CNN_OPS | _MOVEMENT_OPS,
)

TENSORRT = TargetProfile(
    name="tensorrt",
    act_signed=True,
    act_symmetric=True,
    quantized_bias=False,
    share_concat_scale=True,
    activation_ops=frozenset({"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"}),
    float_only_ops=_FLOAT_ONLY,
)

PROFILES = {"ort": ORT, "tensorrt": TENSORRT}


def get_profile(name: str) -> TargetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown target '{name}'; choose one of {', '.join(PROFILES)}") from None


def weight_axis(op_type: str, trans_b: int, weight_rank: int, group: int = 1) -> int | None:
    """The output-channel axis of a weight, where per-channel scales go (None: per-tensor only)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1 if group == 1 else None
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return weight_rank - 1 if weight_rank >= 2 else None
    return None
