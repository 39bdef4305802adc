"""Per-channel L2 norms of activations over calibration data (the statistic Wanda-style pruning needs).

``||X_c||_2 = sqrt(sum over every sample and position of x_c^2)`` for each channel ``c`` on a
tensor's channel axis (axis 1 for a Conv input, the last axis for a MatMul input).
:class:`ChannelNormObserver` is streaming and mergeable (a float64 sum of squares and a count per
channel; memory does not grow with the batches). :func:`collect_channel_norms` runs the model in
onnxruntime (CPU, graph optimisations off, as ``ogt.calib.collect`` does) exposing the requested
tensors, one batch at a time, and returns a :class:`ChannelNorms` table bound to the graph's
fingerprint. Memory: one batch of the requested tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from ..graph.model import Model
from .collect import observe_tensors
from .table import graph_fingerprint


class ChannelNormObserver:
    """Sum of squares per channel on ``axis``; ``update`` / ``merge`` / ``stats`` like the range observers."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self._sumsq: np.ndarray | None = None
        self._count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("a channel-norm observer needs a tensor with a channel axis, got a scalar")
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float64, copy=False)
        rows = np.where(np.isfinite(rows), rows, 0.0)
        sumsq = np.einsum("ij,ij->j", rows, rows)
        if self._sumsq is None:
            self._sumsq = sumsq
        elif self._sumsq.shape != sumsq.shape:
            raise ValueError(f"observer saw {self._sumsq.size} channels before, now {sumsq.size} (axis={self.axis})")
        else:
            self._sumsq += sumsq
        self._count += rows.shape[0]

    def merge(self, other: ChannelNormObserver) -> None:
        if other.axis != self.axis:
            raise ValueError(f"cannot merge channel-norm observers on axes {other.axis} and {self.axis}")
        if other._sumsq is None:
            return
        if self._sumsq is None:
            self._sumsq = other._sumsq.copy()
        elif self._sumsq.shape != other._sumsq.shape:
            raise ValueError(f"cannot merge observers of {self._sumsq.size} and {other._sumsq.size} channels")
        else:
            self._sumsq = self._sumsq + other._sumsq
        self._count += other._count

    def stats(self) -> np.ndarray:
        """The L2 norm per channel (a read-only copy)."""
        if self._sumsq is None:
            raise ValueError("the channel-norm observer has seen no data")
        out = np.sqrt(self._sumsq)
        out.flags.writeable = False
        return out

    @property
    def count(self) -> int:
        """Vectors folded in (samples x positions)."""
        return self._count


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelNorms:
    """Per-channel L2 norms keyed by ``(tensor name, channel axis)``, computed on the graph whose
    fingerprint is ``fingerprint`` over ``samples`` calibration samples."""

    norms: Mapping[tuple[str, int], np.ndarray]
    samples: int
    fingerprint: str

    def get(self, tensor: str, axis: int) -> np.ndarray | None:
        return self.norms.get((tensor, axis))


def collect_channel_norms(
    model: Model, source: Iterable[Mapping[str, np.ndarray]], requests: Mapping[str, int] | Iterable[tuple[str, int]]
) -> ChannelNorms:
    """Per-channel L2 norms of the requested tensors over every batch of ``source``.

    requests: ``{tensor name: channel axis}`` (or ``(name, axis)`` pairs: one tensor may be
    requested on two axes). Tensors must be graph inputs or node outputs of the top-level graph.
    """
    pairs = list(requests.items()) if isinstance(requests, Mapping) else list(requests)
    names = list(dict.fromkeys(name for name, _ in pairs))
    observers = {pair: ChannelNormObserver(pair[1]) for pair in dict.fromkeys(pairs)}
    if not observers:
        return ChannelNorms({}, 0, graph_fingerprint(model))

    def update(values: Mapping[str, np.ndarray]) -> None:
        for (name, _), obs in observers.items():
            obs.update(values[name])

    samples = observe_tensors(model, source, names, update, what="collect channel norms of",
                              exposing="the pruned layers' inputs")
    return ChannelNorms({pair: obs.stats() for pair, obs in observers.items()}, samples, graph_fingerprint(model))
