"""GPU kernel of ``Sparse24MatMul``: a Triton kernel that reads the packed weight directly.

Each program computes a ``BLOCK_M x BLOCK_N`` tile of ``Y = X @ W.T``. Per ``BLOCK_K`` step it
loads the X tile, loads the matching metadata bytes and kept values of ``BLOCK_N`` weight rows,
rebuilds the dense ``BLOCK_K x BLOCK_N`` weight tile in registers (position ``p`` of group ``g``
takes ``values[2g]`` when ``p == i0``, ``values[2g+1]`` when ``p == i1``, else 0) and feeds it to
``tl.dot``. The weight traffic from memory is the packed bytes (53 % of dense float32); the
multiply runs on the dense tensor-core path, not on the sparse tensor cores (that needs the
hardware's interleaved metadata: :func:`semi_structured_weight` hands the same weight to
PyTorch's cuSPARSELt/CUTLASS 2:4 path instead, for comparison).

Importing this module needs neither torch nor triton; the functions import them when called
and raise an ImportError saying what is missing. **Not run on a GPU yet**: the session that
wrote it had no GPU; tests marked ``gpu`` run it against the numpy reference where CUDA exists.
"""

from __future__ import annotations

import functools

from .sparse24 import N, meta_bytes


def unavailable_reason() -> str | None:
    """None when the Triton kernel can run here, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise ImportError("the GPU kernel of Sparse24MatMul needs triton (pip install triton) and a CUDA build of torch") from None

    @triton.jit
    def sparse24_kernel(
        x_ptr, v_ptr, meta_ptr, y_ptr, M, N, K,
        stride_xm, stride_vn, stride_meta, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # dense positions along K
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok & k_ok[None, :], other=0.0)
            g = offs_k // 4
            p = (offs_k % 4)[:, None]
            wk_ok = k_ok[:, None] & n_ok
            byte = tl.load(meta_ptr + offs_n[None, :] * stride_meta + (g // 2)[:, None], mask=wk_ok, other=0)
            nib = (byte.to(tl.int32) >> ((g % 2) * 4)[:, None]) & 15
            v0 = tl.load(v_ptr + offs_n[None, :] * stride_vn + (2 * g)[:, None], mask=wk_ok, other=0.0)
            v1 = tl.load(v_ptr + offs_n[None, :] * stride_vn + (2 * g + 1)[:, None], mask=wk_ok, other=0.0)
            w = tl.where(p == (nib & 3), v0, tl.where(p == ((nib >> 2) & 3), v1, tl.zeros_like(v0)))
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=m_ok & n_ok)

    return triton, sparse24_kernel


def sparse24_matmul(x, values, meta, *, block_m: int = 64, block_n: int = 64, block_k: int = 64,
                    precision: str = "ieee"):
    """``X @ unpack(values, meta).T`` on CUDA torch tensors (float32 or float16); X's last dim is K.

    precision: ``ieee`` (exact float32 products) or ``tf32`` (tensor cores, for float32 inputs).
    """
    import torch

    triton, kernel = _kernel()
    n, half = values.shape
    k = half * N
    if x.shape[-1] != k or meta.shape != (n, meta_bytes(k)) or meta.dtype != torch.uint8:
        raise ValueError(f"Sparse24MatMul: X [..., {x.shape[-1]}], values {list(values.shape)}, meta "
                         f"{meta.dtype} {list(meta.shape)} do not fit (K = 2 * values.shape[1], meta uint8 [N, ceil(K/8)])")
    x2 = x.reshape(-1, k).contiguous()
    values, meta = values.contiguous(), meta.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    kernel[grid](x2, values, meta, y, x2.shape[0], n, k, x2.stride(0), values.stride(0), meta.stride(0), y.stride(0),
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision)
    return y.reshape(*x.shape[:-1], n)


def unpack_torch(values, meta):
    """The dense ``W[N, K]`` on the tensors' device (torch version of :func:`ogt.kernels.sparse24.unpack`)."""
    import torch

    n, half = values.shape
    groups = half // N
    nib = torch.stack([meta & 0xF, meta >> 4], dim=2).reshape(n, -1)[:, :groups].long()
    pos = torch.stack([nib & 3, (nib >> 2) & 3], dim=2)
    w = torch.zeros((n, groups, 4), dtype=values.dtype, device=values.device)
    w.scatter_(2, pos, values.reshape(n, groups, N))
    return w.reshape(n, groups * 4)


def semi_structured_weight(values, meta):
    """The same weight as PyTorch's 2:4 semi-structured tensor (cuSPARSELt or CUTLASS kernels), for
    ``torch.nn.functional.linear(x, w)``; float16/bfloat16 on a GPU that supports it."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(unpack_torch(values, meta))
