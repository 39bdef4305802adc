"""Tensor data access that never loads external data until a transform asks for it.

A model is loaded with ``load_external_data=False``: initializers stored in external files
keep their ``external_data`` entries and are read on demand, one tensor at a time, straight
from the data file. That keeps a 2.5 GB model's peak memory near the bytes a transform
actually rewrites.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import ExternalDataError, UnsafeModelError

_CHUNK = 1 << 24  # 16 MiB


@dataclasses.dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes live: ``location`` is relative to the model's folder."""

    location: str
    offset: int
    length: int | None


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_ref(tensor: TensorProto) -> ExternalRef:
    entries = {e.key: e.value for e in tensor.external_data}
    if not entries.get("location"):
        raise ExternalDataError(f"tensor '{tensor.name}' is marked external but has no location")
    offset = _non_negative(tensor, "offset", entries.get("offset") or "0")
    length = entries.get("length")
    return ExternalRef(entries["location"], offset, _non_negative(tensor, "length", length) if length else None)


def _non_negative(tensor: TensorProto, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ExternalDataError(f"tensor '{tensor.name}': external data {key} '{value}' is not a non-negative integer")
    return number


def element_count(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def np_dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's data needs in raw form; None for types without a fixed item size."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (element_count(tensor) * bits + 7) // 8
    return element_count(tensor) * np_dtype(tensor).itemsize


def nbytes(tensor: TensorProto) -> int:
    """Bytes of data the tensor holds, wherever it lives."""
    if is_external(tensor):
        ref = external_ref(tensor)
        return ref.length if ref.length is not None else (expected_nbytes(tensor) or 0)
    expected = expected_nbytes(tensor)
    if expected is not None:
        return expected  # without touching raw_data: reading a bytes field copies it
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def resolve_location(base_dir: Path | None, tensor: TensorProto) -> Path:
    """The data file of an external tensor, refusing any location outside ``base_dir``."""
    ref = external_ref(tensor)
    loc = ref.location
    if base_dir is None:
        raise ExternalDataError(
            f"tensor '{tensor.name}' uses external data '{loc}' but the model has no folder to resolve it in"
        )
    if Path(loc).is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise UnsafeModelError(
            f"tensor '{tensor.name}': external data location '{loc}' is an absolute path; "
            "ogt only reads external data from the model's own folder"
        )
    base = base_dir.resolve()
    path = (base / loc).resolve()
    if not path.is_relative_to(base):
        raise UnsafeModelError(
            f"tensor '{tensor.name}': external data location '{loc}' escapes the model's folder {base}"
        )
    return path


def check_external(base_dir: Path | None, tensor: TensorProto) -> None:
    """Raise unless the external data of ``tensor`` is safe, present and long enough."""
    path = resolve_location(base_dir, tensor)
    ref = external_ref(tensor)
    if not path.is_file():
        raise ExternalDataError(f"tensor '{tensor.name}': external data file '{ref.location}' not found in {base_dir}")
    expected = expected_nbytes(tensor)
    if ref.length is not None and expected is not None and ref.length != expected:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data length {ref.length} does not match the {expected} bytes "
            f"its shape {list(tensor.dims)} and type need"
        )
    need = ref.length if ref.length is not None else expected
    size = path.stat().st_size
    if need is not None and ref.offset + need > size:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data file '{ref.location}' has {size} bytes, "
            f"but the tensor needs bytes {ref.offset}..{ref.offset + need} (truncated or wrong file)"
        )


def read_raw(base_dir: Path | None, tensor: TensorProto) -> bytes:
    path = resolve_location(base_dir, tensor)
    ref = external_ref(tensor)
    length = ref.length if ref.length is not None else expected_nbytes(tensor)
    with open(path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(length) if length is not None else f.read()
    if length is not None and len(data) != length:
        raise ExternalDataError(f"tensor '{tensor.name}': external data file '{ref.location}' is truncated")
    return data


def iter_raw_chunks(base_dir: Path | None, tensor: TensorProto, chunk: int = _CHUNK):
    """Yield the tensor's raw bytes in chunks (external: straight from the file)."""
    if not is_external(tensor):
        raw = tensor.raw_data if tensor.raw_data else numpy_helper.to_array(tensor).tobytes()
        for i in range(0, max(len(raw), 1), chunk):
            yield raw[i : i + chunk]
        return
    path = resolve_location(base_dir, tensor)
    ref = external_ref(tensor)
    remaining = ref.length if ref.length is not None else expected_nbytes(tensor)
    with open(path, "rb") as f:
        f.seek(ref.offset)
        while remaining is None or remaining > 0:
            n = chunk if remaining is None else min(chunk, remaining)
            data = f.read(n)
            if not data:
                break
            yield data
            if remaining is not None:
                remaining -= len(data)


def to_array(tensor: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """The tensor's values as a numpy array, reading external data from ``base_dir`` if needed."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    if tensor.data_type in _PLAIN_TYPES:
        path = resolve_location(base_dir, tensor)
        ref = external_ref(tensor)
        count = element_count(tensor)
        arr = np.fromfile(path, dtype=np_dtype(tensor), count=count, offset=ref.offset)
        if arr.size != count:
            raise ExternalDataError(f"tensor '{tensor.name}': external data file '{ref.location}' is truncated")
        return arr.reshape(tuple(tensor.dims))
    tmp = TensorProto()
    tmp.CopyFrom(tensor)
    del tmp.external_data[:]
    tmp.data_location = TensorProto.DEFAULT
    tmp.raw_data = read_raw(base_dir, tensor)
    return numpy_helper.to_array(tmp)


def sample_digest(tensor: TensorProto, base_dir: Path | None = None, span: int = 1 << 16) -> str:
    """Cheap content key: hash of the first and last ``span`` bytes (a pre-filter for ``digest``)."""
    h = hashlib.blake2b(digest_size=16)
    if is_external(tensor):
        path = resolve_location(base_dir, tensor)
        ref = external_ref(tensor)
        length = ref.length if ref.length is not None else (expected_nbytes(tensor) or 0)
        with open(path, "rb") as f:
            f.seek(ref.offset)
            h.update(f.read(min(span, length)))
            if length > span:
                f.seek(ref.offset + max(span, length - span))
                h.update(f.read(span))
        return h.hexdigest()
    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    h.update(raw[:span])
    h.update(raw[-span:])
    return h.hexdigest()


def digest(tensor: TensorProto, base_dir: Path | None = None) -> str:
    """Content hash of the tensor's data (streamed for external tensors)."""
    h = hashlib.blake2b(digest_size=20)
    for chunk in iter_raw_chunks(base_dir, tensor):
        h.update(chunk)
    return h.hexdigest()


def set_data(tensor: TensorProto, array: np.ndarray) -> None:
    """Replace the tensor's data in place (dims, dtype, raw bytes), dropping any external reference."""
    array = np.asarray(array)
    name, doc = tensor.name, tensor.doc_string
    tensor.Clear()
    tensor.name, tensor.doc_string = name, doc
    if array.dtype in _DIRECT_DTYPES and sys.byteorder == "little":
        tensor.data_type = _DIRECT_DTYPES[array.dtype]
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array).tobytes()  # one copy
        return
    new = numpy_helper.from_array(np.ascontiguousarray(array))
    tensor.data_type = new.data_type
    tensor.dims.extend(new.dims)
    tensor.raw_data = new.raw_data


_DIRECT_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}

_PLAIN_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.UINT32,
    TensorProto.INT64,
    TensorProto.UINT64,
    TensorProto.BOOL,
}
