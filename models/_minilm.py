"""all-MiniLM-L6-v2 as plain torch: a BERT encoder with mean pooling, loaded from safetensors by hand.

No ``transformers`` and no ``safetensors`` package: :func:`read_safetensors` parses the format
(an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then the raw little-endian bytes) with numpy. :class:`MiniLM` matches the
checkpoint's key names (``embeddings.*``, ``encoder.layer.<i>.*``; the unused ``pooler`` and the
``position_ids`` buffer are dropped) and computes what sentence-transformers computes before its
Normalize module: token embeddings of the last layer and their attention-masked mean.

``decomposed=True`` writes every LayerNorm out as mean, sub, pow, mean, add eps, sqrt, div, mul,
add, so the ONNX export has the decomposed pattern instead of LayerNormalization ops.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
DROPPED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a numpy array (copied out of the file)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data, dtype, (stop - start) // dtype.itemsize, base + start).reshape(info["shape"]).copy()
    return out


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last axis, written out op by op (exports without LayerNormalization)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        d = x - mean
        var = d.pow(2).mean(-1, keepdim=True)
        return d / torch.sqrt(var + self.eps) * self.weight + self.bias


def _layer_norm(width: int, eps: float, decomposed: bool) -> nn.Module:
    return DecomposedLayerNorm(width, eps) if decomposed else nn.LayerNorm(width, eps=eps)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, positions: int, types: int, eps: float, decomposed: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.token_type_embeddings = nn.Embedding(types, width)
        self.LayerNorm = _layer_norm(width, eps, decomposed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_width = width // heads
        self.scale = 1.0 / math.sqrt(self.head_width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s = h.shape[0], h.shape[1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, self.head_width).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) * self.scale + mask_bias
        ctx = torch.softmax(scores, dim=-1) @ v
        return ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_width)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's attention.output and output)."""

    def __init__(self, width_in: int, width: int, eps: float, decomposed: bool):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = _layer_norm(width, eps, decomposed)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float, decomposed: bool):
        super().__init__()
        self.self = _SelfAttention(width, heads)
        self.output = _DenseNorm(width, width, eps, decomposed)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h, mask_bias), h)


class _Intermediate(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(width, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, width: int, inner: int, heads: int, eps: float, decomposed: bool):
        super().__init__()
        self.attention = _Attention(width, heads, eps, decomposed)
        self.intermediate = _Intermediate(width, inner)
        self.output = _DenseNorm(inner, width, eps, decomposed)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, mask_bias)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, layers: int, **kw):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(**kw) for _ in range(layers))


class MiniLM(nn.Module):
    """BERT encoder + attention-masked mean pooling. ``forward(input_ids, attention_mask)`` returns
    ``(token_embeddings [B, S, H], sentence_embedding [B, H])``."""

    def __init__(self, config: dict, decomposed: bool = False):
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = _Embeddings(config["vocab_size"], width, config["max_position_embeddings"],
                                      config["type_vocab_size"], eps, decomposed)
        self.encoder = _Encoder(config["num_hidden_layers"], width=width, inner=config["intermediate_size"],
                                heads=config["num_attention_heads"], eps=eps, decomposed=decomposed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        h = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            h = layer(h, mask_bias)
        weights = mask.unsqueeze(-1)
        pooled = (h * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)
        return h, pooled


def load_minilm(folder: Path, decomposed: bool = False) -> MiniLM:
    """The checkpoint in ``folder`` (config.json + model.safetensors), loaded strictly, eval mode."""
    config = json.loads((folder / "config.json").read_text())
    net = MiniLM(config, decomposed)
    state = {k: torch.from_numpy(v) for k, v in read_safetensors(folder / "model.safetensors").items()
             if k not in DROPPED_KEYS}
    net.load_state_dict(state, strict=True)
    return net.eval()
