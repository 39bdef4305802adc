"""The Triton kernel of Sparse24MatMul against the numpy reference. Needs CUDA, torch and triton:
skipped elsewhere (CI has no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from ogt.kernels import gpu, sparse24
from ogt.transforms import _nm

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def torch():
    reason = gpu.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import torch

    return torch


def packed(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    pruned, _ = _nm.prune_rows(w, np.abs(w), 2, 4)
    return pruned, *sparse24.pack(pruned)


@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (37, 65, 132), (256, 1536, 384), (130, 384, 1536)])
def test_triton_kernel_equals_the_reference(torch, m, n, k):
    _, values, meta = packed(n, k)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    expected = sparse24.sparse24_matmul(x, values, meta)
    got = gpu.sparse24_matmul(*(torch.from_numpy(a).cuda() for a in (x, values, meta))).cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_unpack_on_the_gpu_is_bit_exact(torch):
    pruned, values, meta = packed(64, 96)
    back = gpu.unpack_torch(torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda()).cpu().numpy()
    assert np.array_equal(back, pruned)


def test_float16_and_rank3_input(torch):
    _, values, meta = packed(128, 256)
    x = np.random.default_rng(2).standard_normal((2, 5, 256)).astype(np.float16)
    expected = sparse24.sparse24_matmul(x.astype(np.float32), values, meta)
    got = gpu.sparse24_matmul(torch.from_numpy(x).cuda(), torch.from_numpy(values.astype(np.float16)).cuda(),
                              torch.from_numpy(meta).cuda())
    assert got.shape == (2, 5, 128) and got.dtype == torch.float16
    np.testing.assert_allclose(got.float().cpu().numpy(), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
