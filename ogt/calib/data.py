"""Calibration data sources: streams of ``{graph_input_name: array}`` batches, samples on axis 0.

A :class:`CalibrationSource` is iterated for batches; ``num_samples`` feeds a progress bar and
``reiterable`` says whether it can be read twice. Sources stream: memory holds about one batch,
never the data set.

- ``npz_source``: one ``.npz`` keyed by input name, samples on axis 0. Members are read from
  the zip batch by batch (compressed or not), never whole.
- ``folder_source``: ``.npz`` (as above) and/or ``.npy`` files in sorted name order, regrouped
  into batches. Every array is a batch of samples on axis 0 (save one sample with a leading
  axis of 1). An ``.npy`` feeds ``input_name`` (single-input models), else the input named by
  its file stem.
- ``image_folder_source``: jpg/png/bmp images, resized, cropped and normalised (:class:`ImageOptions`).
- ``iterable_source``: a list (re-iterable) or a generator (one-shot) of batches.
- ``reader_source``: an onnxruntime ``CalibrationDataReader``; re-iterable if it has ``rewind()``.
- ``synthetic_source``: random data from the input spec (floats ~ N(0, 1), integers uniform in
  ``[lo, hi)``, booleans); dynamic dims from ``input_shapes`` (``parse_input_shapes``).

``open_source`` picks one from a command-line path. ``check_source`` checks the first batch's
names, dtypes, ranks and static dims against the graph before any work starts; ``checked``
checks every batch as it streams. Every problem is a :class:`CalibrationError` naming the input
or the file.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx

from ..errors import CalibrationError
from ..graph.model import Model

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
ModelLike = Model | onnx.ModelProto
Dim = int | str | None
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_SUFFIXES = (".npz", ".npy")
_READ_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError)


class CalibrationSource(abc.ABC):
    """Re-iterable stream of batches: each batch is {graph_input_name: np.ndarray} with samples on axis 0."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    @property
    def num_samples(self) -> int | None:
        """Total samples if known (for the progress bar), else None."""
        return None

    @property
    def reiterable(self) -> bool:
        """False for one-shot sources (generators, CalibrationDataReader without rewind)."""
        return True

    def peek(self) -> Batch | None:
        """The first batch (None if empty) without using up a one-shot source: its next read starts with it."""
        it = iter(self)
        try:
            return next(it, None)
        finally:
            getattr(it, "close", lambda: None)()


class _Source(CalibrationSource):
    """A re-iterable source: ``open()`` starts a fresh stream each time."""

    def __init__(self, opener: Callable[[], Iterator[Batch]], label: str, num_samples: Callable[[], int | None] = lambda: None):
        self._open, self._label, self._count, self._n = opener, label, num_samples, None

    def __iter__(self) -> Iterator[Batch]:
        return self._open()

    @property
    def num_samples(self) -> int | None:
        if self._n is None:
            self._n = self._count()
        return self._n

    def __repr__(self) -> str:
        return self._label


class _OneShot(_Source):
    """A source that can be read once; ``peek`` keeps the first batch for that read."""

    def __init__(self, opener: Callable[[], Iterator[Batch]], label: str, num_samples: int | None = None):
        super().__init__(opener, label, lambda: num_samples)
        self._started, self._it, self._first = False, None, None

    @property
    def reiterable(self) -> bool:
        return False

    def peek(self) -> Batch | None:
        if self._it is None:
            if self._started:
                raise CalibrationError(f"{self!r} was already consumed and cannot be read again")
            self._it = self._open()
            self._first = next(self._it, None)
        return self._first

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise CalibrationError(f"{self!r} is one-shot and was already consumed; pass a list, or a reader with rewind()")
        self._started = True
        it, first = self._it or self._open(), self._first
        self._it = self._first = None
        if first is not None:
            yield first
        yield from it


class _Derived(CalibrationSource):
    """``fn`` applied to the stream of an inner source; keeps its one-shot nature and peek."""

    def __init__(self, inner: CalibrationSource, fn: Callable[[Iterator[Batch]], Iterator[Batch]],
                 n: Callable[[], int | None], label: str):
        self.inner, self.fn, self._n, self._label = inner, fn, n, label

    def __iter__(self) -> Iterator[Batch]:
        return self.fn(iter(self.inner))

    def peek(self) -> Batch | None:
        first = self.inner.peek()
        return None if first is None else next(self.fn(iter([first])), None)

    @property
    def num_samples(self) -> int | None:
        return self._n()

    @property
    def reiterable(self) -> bool:
        return self.inner.reiterable

    def __repr__(self) -> str:
        return self._label


def batch_len(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the axis-0 length of its first array with at least one axis (1 if none has)."""
    for value in batch.values():
        if np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return 1


def _take(batch: Batch, start: int, stop: int) -> Batch:
    """Samples [start, stop) of a batch; arrays without that sample axis pass unchanged."""
    n = batch_len(batch)
    return {k: v[start:stop] if v.ndim >= 1 and v.shape[0] == n else v for k, v in batch.items()}


def _as_batch(item: Any, where: str) -> Batch:
    if not isinstance(item, Mapping):
        raise CalibrationError(f"{where}: expected a dict {{input name: array}}, got {type(item).__name__}")
    return {str(k): np.asarray(v) for k, v in item.items()}


# -- graph inputs and checks ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype (None if not a known tensor type), shape (None if rank unknown)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype} {dims}"


def graph_inputs(model: ModelLike) -> list[InputSpec]:
    """The graph's real inputs (graph.input minus initializers), in declaration order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt, dtype, shape = vi.type.tensor_type, None, None
        if vi.type.HasField("tensor_type") and tt.elem_type:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except (KeyError, TypeError, ValueError):
                dtype = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def takes_any_batch(model: ModelLike) -> bool:
    """Every graph input has a known rank and a symbolic or unknown first dimension."""
    specs = graph_inputs(model)
    return bool(specs) and all(s.shape is not None and len(s.shape) >= 1 and not isinstance(s.shape[0], int)
                               for s in specs)


def rebatched(source: CalibrationSource, batch_size: int) -> CalibrationSource:
    """The same samples regrouped into batches of ``batch_size`` (a change of layout starts a new batch)."""
    b = _batch_size(batch_size)
    return _Derived(source, lambda it: _rebatch(it, b), lambda: source.num_samples, f"{source!r} in batches of {b}")


def check_batch(model: ModelLike, batch: Mapping[str, np.ndarray], where: str = "calibration data") -> None:
    """Raise CalibrationError naming the input when a batch does not fit the graph.

    Every graph input present and no unknown names; numpy arrays of exactly the graph's dtype
    (never cast silently); the graph's rank; static dims equal; a symbolic dim takes any size
    but one size across inputs; at least one sample.
    """
    specs = {s.name: s for s in graph_inputs(model)}
    if not isinstance(batch, Mapping) or not batch:
        raise CalibrationError(f"{where}: a batch must be a non-empty dict {{input name: array}}; graph inputs {list(specs)}")
    unknown = [k for k in batch if k not in specs]
    if unknown:
        raise CalibrationError(f"{where}: input {unknown[0]!r} is not an input of the graph (graph inputs: {list(specs)})")
    missing = [k for k in specs if k not in batch]
    if missing:
        raise CalibrationError(f"{where}: input {missing[0]!r} is missing (graph inputs: {list(specs)}; got {list(batch)})")
    symbols: dict[str, tuple[int, str]] = {}
    for name, spec in specs.items():
        _check_array(spec, batch[name], where, symbols)


def _check_array(spec: InputSpec, value: Any, where: str, symbols: dict[str, tuple[int, str]]) -> None:
    at = f"{where}: input {spec.name!r}"
    if not isinstance(value, np.ndarray):
        raise CalibrationError(f"{at}: expected a numpy array, got {type(value).__name__}")
    if spec.dtype is not None and value.dtype != spec.dtype:
        raise CalibrationError(f"{at}: dtype {value.dtype}, the graph expects {spec.dtype}; cast the data (.astype(np.{spec.dtype.name}))")
    if spec.shape is None:
        return
    if value.ndim != len(spec.shape):
        raise CalibrationError(f"{at}: rank {value.ndim} (shape {value.shape}), the graph expects rank {len(spec.shape)} {spec.describe()}")
    if value.ndim >= 1 and value.shape[0] == 0:
        raise CalibrationError(f"{at}: the batch holds 0 samples (shape {value.shape})")
    for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
        if isinstance(want, int) and want != got:
            raise CalibrationError(f"{at}: dimension {axis} is {got}, the graph expects {want} (shape {value.shape}, graph {spec.describe()})")
        if isinstance(want, str):
            seen = symbols.setdefault(want, (got, spec.name))
            if seen[0] != got:
                raise CalibrationError(f"{at}: dimension {axis} ('{want}') is {got}, but input {seen[1]!r} has '{want}' = {seen[0]}")


def check_source(model: ModelLike, source: CalibrationSource) -> None:
    """Check the first batch against the graph before any work starts; a source with no batch is an error."""
    first = source.peek()
    if first is None:
        raise CalibrationError(f"{source!r}: yields no batches (no samples); calibration needs data")
    check_batch(model, first, where=f"{source!r}, batch 0")


def checked(model: ModelLike, source: CalibrationSource) -> CalibrationSource:
    """The same stream with every batch checked against the graph as it passes (errors name the batch)."""

    def run(it: Iterator[Batch]) -> Iterator[Batch]:
        for i, batch in enumerate(it):
            check_batch(model, batch, where=f"{source!r}, batch {i}")
            yield batch

    return _Derived(source, run, lambda: source.num_samples, repr(source))


def limit(source: CalibrationSource, n_samples: int) -> CalibrationSource:
    """The first ``n_samples`` samples of ``source`` (the last batch sliced); reads no further."""
    if n_samples < 1:
        raise CalibrationError(f"the number of calibration samples must be at least 1, got {n_samples}")

    def run(it: Iterator[Batch]) -> Iterator[Batch]:
        left = n_samples
        for batch in it:
            k = batch_len(batch)
            yield batch if k <= left else _take(batch, 0, left)
            left -= min(k, left)
            if left == 0:
                break
        getattr(it, "close", lambda: None)()

    def count() -> int | None:
        total = source.num_samples
        return None if total is None else min(total, n_samples)

    return _Derived(source, run, count, f"{source!r}[:{n_samples}]")


# -- .npy / .npz streaming --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


def _read_header(fp: IO[bytes], key: str, path: Path) -> _Header:
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fp)
    else:
        shape, fortran, dtype = fmt._read_array_header(fp, version)  # no public reader for format v3
    h = _Header(tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran))
    if h.dtype.hasobject:
        raise CalibrationError(f"{path}: array {key!r} holds Python objects; only numeric arrays are accepted")
    if not h.shape:
        raise CalibrationError(f"{path}: array {key!r} is a scalar; arrays are batches of samples on axis 0 (one sample: leading axis of 1)")
    return h


def _npz_members(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    """(member, key) pairs; np.savez stores key ``k`` as ``k.npy``."""
    return [(m, m.removesuffix(".npy")) for m in zf.namelist() if not m.endswith("/")]


def _npz_samples(path: Path) -> int:
    """Samples in an .npz, from the array headers only; arrays must agree on axis 0."""
    try:
        with zipfile.ZipFile(path) as zf:
            counts = {}
            for member, key in _npz_members(zf):
                with zf.open(member) as fp:
                    counts[key] = _read_header(fp, key, path).shape[0]
    except _READ_ERRORS as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if not counts:
        raise CalibrationError(f"{path}: the .npz file holds no arrays")
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{path}: arrays hold different numbers of samples on axis 0: {counts}")
    return next(iter(counts.values()))


def _read_rows(fp: IO[bytes], h: _Header, rows: int, key: str, path: Path) -> np.ndarray:
    shape = (rows, *h.shape[1:])
    buf = bytearray(int(np.prod(shape, dtype=np.int64)) * h.dtype.itemsize)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = fp.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise CalibrationError(f"{path}: array {key!r} is truncated")
        got += n
    return _native(np.frombuffer(buf, dtype=h.dtype).reshape(shape))


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _iter_npz(path: Path, batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` samples read from every member stream in step, never a whole array."""
    total = _npz_samples(path)
    try:
        with zipfile.ZipFile(path) as zf, contextlib.ExitStack() as files:
            streams, whole = {}, {}
            for member, key in _npz_members(zf):
                fp = files.enter_context(zf.open(member))
                h = _read_header(fp, key, path)
                if h.fortran and len(h.shape) > 1:  # rows are not contiguous: load this one array whole
                    with zf.open(member) as again:
                        whole[key] = _native(np.ascontiguousarray(np.lib.format.read_array(again, allow_pickle=False)))
                else:
                    streams[key] = (fp, h)
            for start in range(0, total, batch_size):
                rows = min(batch_size, total - start)
                batch = {k: _read_rows(fp, h, rows, k, path) for k, (fp, h) in streams.items()}
                yield batch | {k: v[start : start + rows] for k, v in whole.items()}
    except _READ_ERRORS as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None


def _iter_npy(path: Path, key: str, batch_size: int) -> Iterator[Batch]:
    """Batches sliced from a memory-mapped .npy."""
    if _npy_samples(path, key) == 0:
        return
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except _READ_ERRORS as exc:
        raise CalibrationError(f"{path}: not a readable .npy file ({exc})") from None
    for start in range(0, arr.shape[0], batch_size):
        yield {key: _native(np.ascontiguousarray(arr[start : start + batch_size]))}


def _npy_samples(path: Path, key: str | None = None) -> int:
    try:
        with open(path, "rb") as fp:
            return _read_header(fp, key or path.stem, path).shape[0]
    except _READ_ERRORS as exc:
        raise CalibrationError(f"{path}: not a readable .npy file ({exc})") from None


def _batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise CalibrationError(f"batch size must be at least 1, got {batch_size}")
    return int(batch_size)


def _existing(path: str | os.PathLike[str], folder: bool) -> Path:
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"{p}: no such {'folder' if folder else 'file'}")
    if folder != p.is_dir() or not (folder or p.is_file()):
        raise CalibrationError(f"{p}: not a {'folder' if folder else 'regular file'}")
    return p


def npz_source(path: str | os.PathLike[str], batch_size: int = 1) -> CalibrationSource:
    """One .npz keyed by input name, samples on axis 0, streamed ``batch_size`` samples at a time."""
    p, b = _existing(path, folder=False), _batch_size(batch_size)
    total = _npz_samples(p)  # validates the file before any work starts
    return _Source(lambda: _iter_npz(p, b), f"npz_source('{p}')", lambda: total)


def _same_layout(a: Batch, b: Batch) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape[1:] == b[k].shape[1:] for k in a)


def _rebatch(chunks: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Regroup chunks into batches of ``batch_size``; a change of keys, dtypes or sample shape starts a new batch."""
    pending: list[Batch] = []
    count = 0
    for chunk in chunks:
        if pending and not _same_layout(pending[0], chunk):
            yield _concat(pending)
            pending, count = [], 0
        n, start = batch_len(chunk), 0
        while start < n:
            take = min(batch_size - count, n - start)
            pending.append(chunk if take == n else _take(chunk, start, start + take))
            count, start = count + take, start + take
            if count == batch_size:
                yield _concat(pending)
                pending, count = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[Batch]) -> Batch:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _array_files(files: list[Path], batch_size: int, input_name: str | None, label: str) -> CalibrationSource:
    def chunks() -> Iterator[Batch]:
        for f in files:
            log.debug("calibration data: reading %s", f)
            npz = f.suffix.lower() == ".npz"
            yield from _iter_npz(f, batch_size) if npz else _iter_npy(f, input_name or f.stem, batch_size)

    def count() -> int:
        return sum(_npz_samples(f) if f.suffix.lower() == ".npz" else _npy_samples(f) for f in files)

    return _Source(lambda: _rebatch(chunks(), batch_size), label, count)


def folder_source(path: str | os.PathLike[str], batch_size: int = 1, *, input_name: str | None = None) -> CalibrationSource:
    """A folder of .npz and/or .npy files in sorted name order, regrouped into batches of ``batch_size``.

    Every array is a batch of samples on axis 0 (one sample needs a leading axis of 1). An
    .npz is keyed by input name; an .npy feeds ``input_name`` when given (single-input models:
    any file name), else the input named by its stem. Sub-folders are ignored.
    """
    folder = _existing(path, folder=True)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)
    if not files:
        raise CalibrationError(f"{folder}: the folder holds no .npz or .npy files")
    return _array_files(files, _batch_size(batch_size), input_name, f"folder_source('{folder}')")


# -- images -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Image preprocessing, in this order.

    1. decode and convert to RGB;
    2. crop "center": scale the shorter side to ``resize`` (None: keep), cut the central
       ``size`` = (height, width); crop "none": resize to ``size``, aspect ignored (bilinear);
    3. ``x = pixel * scale``, then ``(x - mean) / std`` per channel, ``mean``/``std`` in RGB order;
    4. reorder to ``channel_order`` (RGB or BGR), lay out as ``layout`` (NCHW or NHWC), cast to ``dtype``.
    """

    size: tuple[int, int] = (224, 224)
    resize: int | None = 256
    crop: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    channel_order: str = "RGB"
    scale: float = 1 / 255
    dtype: Any = np.float32

    def __post_init__(self) -> None:
        for field, value, allowed in (("crop", self.crop, ("center", "none")), ("layout", self.layout, ("NCHW", "NHWC")),
                                      ("channel order", self.channel_order, ("RGB", "BGR"))):
            if value not in allowed:
                raise CalibrationError(f"image {field} must be one of {allowed}, got {value!r}")
        if len(self.size) != 2 or min(self.size) < 1 or (self.resize is not None and self.resize < 1):
            raise CalibrationError(f"image size must be (height, width) >= 1 and resize >= 1, got {self.size}, {self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or 0 in self.std:
            raise CalibrationError(f"image mean and std need 3 values each (std non-zero), got {self.mean}, {self.std}")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image calibration data needs Pillow: pip install Pillow") from None
    return Image


def load_image(path: Path, opts: ImageOptions) -> np.ndarray:
    """One preprocessed image: shape (3, H, W) for NCHW, (H, W, 3) for NHWC."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            img = _resize_crop(Image, im.convert("RGB"), opts, path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CalibrationError(f"{path}: not a readable image ({exc})") from None
    x = (np.asarray(img, dtype=np.float64) * opts.scale - np.asarray(opts.mean)) / np.asarray(opts.std)
    if opts.channel_order == "BGR":
        x = x[..., ::-1]
    if opts.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=opts.dtype)


def _resize_crop(Image: Any, img: Any, opts: ImageOptions, path: Path) -> Any:
    th, tw = opts.size
    if opts.crop == "none":
        return img.resize((tw, th), Image.Resampling.BILINEAR)
    w, h = img.size
    if opts.resize is not None:
        s = opts.resize / min(w, h)
        w, h = (opts.resize, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), opts.resize)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    if w < tw or h < th:
        raise CalibrationError(f"{path}: image is {w}x{h} (WxH) after resizing, smaller than the {tw}x{th} crop; raise resize")
    left, top = round((w - tw) / 2.0), round((h - th) / 2.0)
    return img.crop((left, top, left + tw, top + th))


def _images(folder: Path, input_name: str, opts: ImageOptions, batch_size: int) -> CalibrationSource:
    _pil()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{folder}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")

    def batches() -> Iterator[Batch]:
        for start in range(0, len(files), batch_size):
            yield {input_name: np.stack([load_image(f, opts) for f in files[start : start + batch_size]])}

    return _Source(batches, f"image_folder_source('{folder}')", lambda: len(files))


def image_folder_source(
    path: str | os.PathLike[str], input_name: str, *, size: tuple[int, int] = (224, 224), resize: int | None = 256,
    crop: str = "center", mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
    layout: str = "NCHW", channel_order: str = "RGB", scale: float = 1 / 255, dtype: Any = np.float32, batch_size: int = 1,
) -> CalibrationSource:
    """A folder of jpg/png/bmp images (sorted by name) feeding ``input_name``; see :class:`ImageOptions`."""
    opts = ImageOptions(tuple(size), resize, crop, tuple(mean), tuple(std), layout, channel_order, scale, np.dtype(dtype))  # type: ignore[arg-type]
    return _images(_existing(path, folder=True), input_name, opts, _batch_size(batch_size))


# -- Python iterables and onnxruntime readers -------------------------------------------------


def iterable_source(iterable: Iterable[Mapping[str, Any]], num_samples: int | None = None) -> CalibrationSource:
    """Batches from Python: a list (or other re-iterable collection) or a one-shot generator/iterator."""
    label = f"iterable_source({type(iterable).__name__})"

    def batches() -> Iterator[Batch]:
        return (_as_batch(item, f"{label}, item {i}") for i, item in enumerate(iterable))

    if iter(iterable) is iterable:
        return _OneShot(batches, label, num_samples)
    if num_samples is None and isinstance(iterable, Sequence):
        num_samples = sum(batch_len(_as_batch(b, label)) for b in iterable)
    return _Source(batches, label, lambda: num_samples)


def reader_source(reader: Any) -> CalibrationSource:
    """An onnxruntime ``CalibrationDataReader``: get_next() until None; re-iterable when it has ``rewind()``."""
    if not callable(getattr(reader, "get_next", None)):
        raise CalibrationError(f"{type(reader).__name__} is not a CalibrationDataReader (it has no get_next())")
    label = f"reader_source({type(reader).__name__})"
    rewind = getattr(reader, "rewind", None)

    def batches() -> Iterator[Batch]:
        if callable(rewind):
            rewind()
        for i in itertools.count():
            item = reader.get_next()
            if item is None:
                return
            yield _as_batch(item, f"{label}, item {i}")

    return _Source(batches, label) if callable(rewind) else _OneShot(batches, label)


# -- synthetic data ---------------------------------------------------------------------------


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224`` options (repeatable; the name may itself contain ':')."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = dims.replace(",", "x").split("x") if dims else []
        if not sep or not name or not parts or not all(p.strip().isdigit() for p in parts):
            raise CalibrationError(f"input shape {spec!r}: expected NAME:DIMS such as 'image:1x3x224x224'")
        if name in shapes:
            raise CalibrationError(f"input shape for {name!r} given twice")
        shapes[name] = tuple(int(p) for p in parts)
        if 0 in shapes[name]:
            raise CalibrationError(f"input shape {spec!r}: dimensions must be at least 1")
    return shapes


def _resolve_shape(spec: InputSpec, given: tuple[int, ...] | None, symbols: Mapping[str, int]) -> tuple[int, ...]:
    """One batch's shape; axis 0 is replaced by the batch's sample count later."""
    if given is not None:
        if spec.shape is not None and len(given) != len(spec.shape):
            raise CalibrationError(f"input shape for {spec.name!r} has rank {len(given)}, the graph expects {spec.describe()}")
        for axis, (want, got) in enumerate(zip(spec.shape or (), given)):
            if axis > 0 and isinstance(want, int) and want != got:
                raise CalibrationError(f"input shape for {spec.name!r}: dimension {axis} is {got}, the graph fixes it to {want}")
        return given
    if spec.shape is None:
        raise CalibrationError(f"input {spec.name!r} has no shape in the graph; give one with --input-shape {spec.name}:DIMS")
    dims = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) or axis == 0:
            dims.append(d if isinstance(d, int) else 1)
        elif d in symbols:
            dims.append(symbols[d])
        else:
            example = "x".join(str(x) if isinstance(x, int) else "1" if i == 0 else f"<{x or '?'}>" for i, x in enumerate(spec.shape))
            raise CalibrationError(f"input {spec.name!r}: dimension {axis} ({d or 'unnamed'}) is dynamic; "
                                   f"set it with --input-shape {spec.name}:{example}")
    return tuple(dims)


def _symbols(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Sizes of symbolic dims implied by the given shapes, so inputs sharing 'seq' agree."""
    out: dict[str, int] = {}
    for spec in specs:
        for axis, (d, v) in enumerate(zip(spec.shape or (), shapes.get(spec.name, ()))):
            if axis > 0 and isinstance(d, str) and out.setdefault(d, v) != v:
                raise CalibrationError(f"input shapes disagree on dimension '{d}': {out[d]} and {v} (input {spec.name!r})")
    return out


def _check_synthetic(specs: Sequence[InputSpec], shapes: Mapping[str, Any], ranges: Mapping[str, tuple[int, int]],
                     default: tuple[int, int], batch_size: int) -> None:
    names = [s.name for s in specs]
    for option, given in (("input shape", shapes), ("integer range", ranges)):
        for name in given:
            if name not in names:
                raise CalibrationError(f"{option} for {name!r}: the graph has no such input (inputs: {names})")
    for spec in specs:
        if spec.dtype is None or spec.dtype.kind not in "fiub":
            raise CalibrationError(f"input {spec.name!r}: cannot synthesize data of type {spec.dtype}")
        lo, hi = ranges.get(spec.name, default)
        if spec.dtype.kind in "iu" and not (np.iinfo(spec.dtype).min <= lo < hi <= np.iinfo(spec.dtype).max + 1):
            raise CalibrationError(f"input {spec.name!r}: integer range [{lo}, {hi}) is empty or outside {spec.dtype}")
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] != batch_size:
            raise CalibrationError(f"input {spec.name!r} has a fixed batch dimension of {spec.shape[0]}; use batch size {spec.shape[0]}")


def _batch_shape(spec: InputSpec, shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """Axis 0 holds the batch's samples, unless the graph fixes it."""
    if not shape or (spec.shape and isinstance(spec.shape[0], int)):
        return shape
    return (rows, *shape[1:])


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...], int_range: tuple[int, int]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(int_range[0], int_range[1], shape).astype(dtype)


def synthetic_source(
    model: ModelLike, n: int, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    int_ranges: Mapping[str, tuple[int, int]] | None = None, default_int_range: tuple[int, int] = (0, 100),
    batch_size: int = 1, seed: int = 0,
) -> CalibrationSource:
    """``n`` random samples from the graph's input spec; the same data on every read for one seed.

    Floats ~ N(0, 1), integers uniform in ``[lo, hi)`` (``int_ranges[name]``, else
    ``default_int_range``), booleans fair. Axis 0 is the sample axis: each batch holds
    ``batch_size`` samples (the last may hold fewer), whatever the first dim in ``input_shapes``
    says. Other dynamic dims come from ``input_shapes`` (full shapes, as ``--input-shape
    ids:1x128``); a symbol given for one input fills the same symbol in the others; a dim left
    unset is a CalibrationError naming the input and dim.
    """
    if n < 1:
        raise CalibrationError(f"synthetic calibration needs at least 1 sample, got {n}")
    batch_size = _batch_size(batch_size)
    specs, shapes, ranges = graph_inputs(model), dict(input_shapes or {}), dict(int_ranges or {})
    _check_synthetic(specs, shapes, ranges, tuple(default_int_range), batch_size)  # type: ignore[arg-type]
    symbols = _symbols(specs, shapes)
    plan = [(s, _resolve_shape(s, shapes.get(s.name), symbols), tuple(ranges.get(s.name, default_int_range))) for s in specs]

    def batches() -> Iterator[Batch]:
        rng = np.random.default_rng(seed)
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            yield {s.name: _random(rng, s.dtype, _batch_shape(s, shape, rows), r) for s, shape, r in plan}  # type: ignore[arg-type]

    return _Source(batches, f"synthetic_source(n={n})", lambda: n)


# -- command line -----------------------------------------------------------------------------


def _single_input(model: ModelLike, path: Path, what: str) -> InputSpec:
    specs = graph_inputs(model)
    if len(specs) != 1:
        raise CalibrationError(f"{path}: {what} can feed only a single-input model; this graph has inputs "
                               f"{[s.name for s in specs]} (use an .npz keyed by input name)")
    return specs[0]


def _image_options(spec: InputSpec, given: ImageOptions | Mapping[str, Any] | None) -> ImageOptions:
    """Explicit options win; layout, size, resize and dtype otherwise follow the input's static shape."""
    if isinstance(given, ImageOptions):
        return given
    opts, fields = dict(given or {}), {f.name for f in dataclasses.fields(ImageOptions)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise CalibrationError(f"unknown image option {unknown[0]!r} (options: {sorted(fields)})")
    opts.update({k: tuple(opts[k]) for k in ("size", "mean", "std") if k in opts})
    shape = spec.shape or ()
    if len(shape) == 4:
        opts.setdefault("layout", "NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW")
        hw = shape[1:3] if opts["layout"] == "NHWC" else shape[2:4]
        if "size" not in opts and all(isinstance(d, int) for d in hw):
            opts["size"] = tuple(hw)
            opts.setdefault("resize", round(min(hw) / 0.875))  # type: ignore[type-var]
    if spec.dtype is not None and spec.dtype.kind == "f":
        opts.setdefault("dtype", spec.dtype)
    return ImageOptions(**opts)


def open_source(
    spec: str | os.PathLike[str], model: ModelLike, *, batch_size: int = 1,
    image_options: ImageOptions | Mapping[str, Any] | None = None,
) -> CalibrationSource:
    """The source a command-line path names: an .npz file, an .npy file (single-input model), a
    folder of .npz/.npy files, or a folder of images (single-input model; options not given
    follow the input's static shape: layout, size, resize = size / 0.875, float dtype)."""
    path, b = Path(spec), _batch_size(batch_size)
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".npz":
        return npz_source(path, b)
    if path.is_file() and path.suffix.lower() == ".npy":
        _npy_samples(path)
        return _array_files([path], b, _single_input(model, path, "an .npy file").name, f"npy_source('{path}')")
    if not path.is_dir():
        raise CalibrationError(f"{path}: calibration data must be an .npz or .npy file, or a folder of them or of images")
    suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
    if suffixes & set(ARRAY_SUFFIXES):
        name = _single_input(model, path, "a folder of .npy files").name if ".npy" in suffixes else None
        return folder_source(path, b, input_name=name)
    if suffixes & set(IMAGE_SUFFIXES):
        input_spec = _single_input(model, path, "a folder of images")
        return _images(path, input_spec.name, _image_options(input_spec, image_options), b)
    raise CalibrationError(f"{path}: the folder holds no .npz, .npy or image files")
