"""Per-channel ``max |x|`` of activations over calibration data, plus a row sample (SmoothQuant's statistics).

:class:`ChannelAbsMaxObserver` folds batches of one tensor in: the running ``max |x_c|`` for each
channel ``c`` of the last axis, and a uniform sample of at most ``keep_rows`` rows (vectors of
all channels at one sample and position; a bottom-k sketch on random keys, so two observers
merge into exactly the sample of the union). Memory does not grow with the number of batches.
Non-finite values are ignored in the max.

:func:`collect_channel_absmax` runs the model in onnxruntime (CPU, graph optimisations off)
exposing the requested tensors, one batch at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..graph.model import Model
from .collect import observe_tensors


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelAbsMax:
    """``absmax``: float64 ``(C,)``; ``rows``: float32 ``(R, C)`` sampled rows (R may be 0); ``count``: rows seen."""

    absmax: np.ndarray
    rows: np.ndarray
    count: int


class ChannelAbsMaxObserver:
    def __init__(self, keep_rows: int = 0, seed: int = 0):
        self.keep_rows = int(keep_rows)
        self._rng = np.random.default_rng(seed)
        self._absmax: np.ndarray | None = None
        self._keys = np.empty(0)
        self._rows: np.ndarray | None = None
        self._count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("a per-channel observer needs a tensor with a channel axis, got a scalar")
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            return
        mag = np.abs(rows.astype(np.float64, copy=False))
        amax = np.where(np.isfinite(mag), mag, 0.0).max(axis=0)
        self._fold(amax, self._rng.random(rows.shape[0]), rows.astype(np.float32), rows.shape[0])

    def merge(self, other: ChannelAbsMaxObserver) -> None:
        if other._absmax is not None:
            self._fold(other._absmax, other._keys, other._rows, other._count)

    def _fold(self, amax: np.ndarray, keys: np.ndarray, rows: np.ndarray | None, count: int) -> None:
        if self._absmax is None:
            self._absmax = amax.copy()
        elif self._absmax.shape != amax.shape:
            raise ValueError(f"observer saw {self._absmax.size} channels before, now {amax.size}")
        else:
            np.maximum(self._absmax, amax, out=self._absmax)
        self._count += count
        if self.keep_rows and rows is not None and len(rows):
            keys = np.concatenate([self._keys, keys])
            both = rows if self._rows is None else np.concatenate([self._rows, rows])
            keep = np.sort(np.argsort(keys, kind="stable")[: self.keep_rows])
            self._keys, self._rows = keys[keep], both[keep]

    def stats(self) -> ChannelAbsMax:
        if self._absmax is None:
            raise ValueError("the observer has seen no data")
        width = self._absmax.size
        rows = self._rows if self._rows is not None else np.empty((0, width), np.float32)
        return ChannelAbsMax(self._absmax.copy(), rows.copy(), self._count)


def collect_channel_absmax(
    model: Model, source: Iterable[Mapping[str, np.ndarray]], tensors: Sequence[str], *, keep_rows: int = 0, seed: int = 0
) -> dict[str, ChannelAbsMax]:
    """Per-channel (last axis) ``max |x|`` of each tensor in ``tensors`` over every batch of ``source``."""
    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    observers = {n: ChannelAbsMaxObserver(keep_rows, seed + k) for k, n in enumerate(names)}

    def update(values: Mapping[str, np.ndarray]) -> None:
        for name, obs in observers.items():
            obs.update(values[name])

    observe_tensors(model, source, names, update, what="observe", exposing=f"{len(names)} tensors")
    return {n: obs.stats() for n, obs in observers.items()}
