"""``ai.ogt::Sparse24MatMul``: a matrix product with a 2:4-sparse weight stored compressed.

Semantics::

    Y[..., N] = X[..., K] @ W.T          W[N, K] = unpack(values, meta)

Inputs

- ``X``: ``T[..., K]`` (T = float or float16), any rank >= 1.
- ``values``: ``T[N, K/2]``: the two kept values of every group of 4 consecutive weights along K,
  in increasing position order (row ``n`` holds output feature ``n``'s weights: the ``[N, K]``
  orientation of a ``Gemm`` with ``transB=1``, of PyTorch's ``Linear`` and of cuSPARSELt's
  compressed operand).
- ``meta``: ``uint8[N, ceil(K/8)]``: 2-bit positions. Group ``g`` (weights ``4g .. 4g+3``) has one
  4-bit nibble, the low nibble of byte ``g // 2`` when ``g`` is even, the high nibble when odd;
  in it bits 0-1 are the position ``i0`` of ``values[n, 2g]`` and bits 2-3 the position ``i1``
  of ``values[n, 2g+1]``, with ``i0 < i1``. A group with fewer than two non-zeros stores zeros
  in the free slots (at the lowest free positions). A padding nibble (odd group count) is 0.

So ``W[n, 4g + i0] = values[n, 2g]``, ``W[n, 4g + i1] = values[n, 2g + 1]``, every other weight 0.
Bytes: ``K/2`` values plus ``K/8`` metadata bytes per row: 53.1 % of dense float32, 56.3 % of
float16. (NVIDIA's hardware metadata is the same 2 x 2 bits per group, stored interleaved for the
tensor cores; the GPU kernel in :mod:`ogt.kernels.gpu` reads this plain row-major form.)

Pack then unpack gives back the dense weight bit for bit, except that ``-0.0`` comes back as
``+0.0`` (zeros are not stored).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

DOMAIN = "ai.ogt"
OP_TYPE = "Sparse24MatMul"
VERSION = 1
N, M = 2, 4


def meta_bytes(k: int) -> int:
    return (k // M + 1) // 2


def pack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compress a 2:4-sparse ``W[N, K]`` into ``(values[N, K/2], meta[N, ceil(K/8)])``.

    Raises ValueError when K is not a multiple of 4 or a group has more than two non-zeros.
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] % M:
        raise ValueError(f"pack needs a 2-D weight [N, K] with K a multiple of {M}, got shape {list(w.shape)}")
    rows, k = w.shape
    g = k // M
    wg = w.reshape(rows, g, M)
    nz = wg != 0
    if (nz.sum(axis=2) > N).any():
        r, c = np.argwhere(nz.sum(axis=2) > N)[0]
        raise ValueError(f"weight row {r}, group {c} (values {4 * c}..{4 * c + 3}) has more than {N} non-zeros; prune it to 2:4 first")
    key = np.where(nz, 0, M) + np.arange(M)  # non-zeros first, then free slots, each by position
    pos = np.sort(np.argsort(key, axis=2, kind="stable")[..., :N], axis=2)
    values = np.take_along_axis(wg, pos, axis=2).reshape(rows, g * N)
    values = np.where(values == 0, np.zeros((), w.dtype), values)  # -0.0 -> +0.0, as unpack returns
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint8)
    if g % 2:
        nibble = np.concatenate([nibble, np.zeros((rows, 1), np.uint8)], axis=1)
    meta = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(values), np.ascontiguousarray(meta)


def positions(meta: np.ndarray, groups: int) -> np.ndarray:
    """The kept positions ``[N, groups, 2]`` (each in 0..3) encoded by ``meta``."""
    meta = np.asarray(meta, dtype=np.uint8)
    nibbles = np.stack([meta & 0xF, meta >> 4], axis=2).reshape(meta.shape[0], -1)[:, :groups]
    return np.stack([nibbles & 3, (nibbles >> 2) & 3], axis=2).astype(np.intp)


def unpack(values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """The dense ``W[N, K]`` that ``(values, meta)`` encode."""
    values = np.asarray(values)
    rows, half = values.shape
    g = half // N
    w = np.zeros((rows, g, M), dtype=values.dtype)
    np.put_along_axis(w, positions(meta, g), values.reshape(rows, g, N), axis=2)
    return w.reshape(rows, g * M)


def check_inputs(x: np.ndarray, values: np.ndarray, meta: np.ndarray) -> None:
    if values.ndim != 2 or meta.ndim != 2:
        raise ValueError(f"{OP_TYPE}: values and meta must be 2-D, got {list(values.shape)} and {list(meta.shape)}")
    k = values.shape[1] * N
    if x.shape[-1] != k:
        raise ValueError(f"{OP_TYPE}: X's last dim is {x.shape[-1]} but values [N, K/2] = {list(values.shape)} implies K={k}")
    if meta.shape != (values.shape[0], meta_bytes(k)) or meta.dtype != np.uint8:
        raise ValueError(f"{OP_TYPE}: meta must be uint8 [{values.shape[0]}, {meta_bytes(k)}], got {meta.dtype} {list(meta.shape)}")


def sparse24_matmul(x: np.ndarray, values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """Reference kernel: decompress the weight, then one dense product (in X's dtype)."""
    x, values, meta = np.asarray(x), np.asarray(values), np.asarray(meta)
    check_inputs(x, values, meta)
    w = unpack(values, meta)
    return np.matmul(x, w.T.astype(x.dtype, copy=False))


class Sparse24MatMul(OpRun):
    """The reference kernel for ``onnx.reference.ReferenceEvaluator(model, new_ops=[Sparse24MatMul])``."""

    op_domain = DOMAIN

    def _run(self, x, values, meta):
        return (sparse24_matmul(x, values, meta),)


def schema() -> OpSchema:
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        "Y = X @ W.T with W[N, K] 2:4-sparse, stored as kept values [N, K/2] and 2-bit positions "
        "uint8 [N, ceil(K/8)] (see ogt.kernels.sparse24).",
        inputs=[
            OpSchema.FormalParameter("X", "T", "input [..., K]"),
            OpSchema.FormalParameter("values", "T", "kept weights [N, K/2]"),
            OpSchema.FormalParameter("meta", "tensor(uint8)", "positions of the kept weights [N, ceil(K/8)]"),
        ],
        outputs=[OpSchema.FormalParameter("Y", "T", "output [..., N]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float types")],
    )


def register_schema() -> None:
    """Make onnx (checker, shape inference) know the op; idempotent."""
    try:
        onnx.defs.get_schema(OP_TYPE, VERSION, DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema())
