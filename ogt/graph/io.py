"""Loading and saving models: safe paths, lazy external data, atomic writes.

``load`` parses the protobuf without pulling external data into memory, checks that every
external reference stays inside the model's folder and points at enough bytes, and validates
the graph. ``save`` writes the model and (optionally) one external data file to temporary
names and renames them into place only when both are complete, streaming each external tensor
straight from its source file so memory stays near one tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ..errors import InputNotFoundError, InvalidModelError, OutputError
from . import tensors
from .model import Model
from .validate import validate as validate_model

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
#: Models whose tensors add up to more than this are saved with external data automatically.
AUTO_EXTERNAL_BYTES = 2**31 - 2**26
DEFAULT_SIZE_THRESHOLD = 1024


def load(path: str | os.PathLike[str], *, validate: bool = True) -> Model:
    """Load an ONNX model; external data stays on disk until a transform reads it."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise InputNotFoundError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{p}: file is empty (0 bytes), not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise InvalidModelError(
            f"{p}: a single {size / 2**30:.1f} GiB protobuf file cannot be parsed (2 GiB limit); "
            "large models must keep their weights in external data"
        )
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{p}: not a valid ONNX model: the protobuf does not parse ({exc}); the file is truncated, corrupt, or not ONNX"
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise InvalidModelError(f"{p}: not an ONNX model (no IR version or no graph in the parsed protobuf)")
    model = Model(proto, base_dir=p.resolve().parent, source=p.resolve())
    for t in model.iter_tensors():
        if tensors.is_external(t):
            tensors.check_external(model.base_dir, t)
    if validate:
        validate_model(model)
    return model


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    size_threshold: int = DEFAULT_SIZE_THRESHOLD,
    location: str | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    external_data: True keeps every tensor of at least ``size_threshold`` bytes in one data file
    beside the model (named ``location``, default ``<file name>.data``); False inlines all data;
    None (default) chooses external when the model already used it or is too big for protobuf.
    After an external save the in-memory model reads its data from the new file.
    """
    out = Path(path)
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    if external_data is None:
        external_data = model.uses_external_data() or model.weight_bytes() > AUTO_EXTERNAL_BYTES
    if external_data:
        _save_external(model, out, size_threshold, location or f"{out.name}.data")
    else:
        _save_inline(model, out)
    return out


def _save_inline(model: Model, out: Path) -> None:
    total = model.weight_bytes()
    if total > AUTO_EXTERNAL_BYTES:
        raise OutputError(
            f"{out}: {total / 2**30:.2f} GiB of tensors cannot be stored inline (protobuf 2 GiB limit); save with external data"
        )
    check_not_a_source(model, out)
    for t in model.iter_tensors():
        if tensors.is_external(t):
            tensors.set_data(t, model.array(t))
    with atomic_file(out) as tmp:
        tmp.write_bytes(_serialize(model, out))


def _save_external(model: Model, out: Path, threshold: int, location: str) -> None:
    """Write data and model to temporary files, fsync both, then rename data, then model.

    Nothing is renamed until both files are complete; on any failure the moved tensors are
    read back into the protos and the temporary files are deleted.
    """
    if Path(location).name != location or location in ("", ".", ".."):
        raise OutputError(f"external data location '{location}' must be a plain file name (it is written beside {out.name})")
    data_path = out.parent / location
    if data_path.resolve() == out.resolve():
        raise OutputError(f"{out}: the external data file cannot have the model's own name")
    _refuse_clobbering_sources(model, out, data_path)
    moved: list[tuple[TensorProto, int, int]] = []
    tmp_data, tmp_model = _temp_beside(data_path), _temp_beside(out)
    try:
        with open(tmp_data, "wb") as f:
            for t in model.iter_tensors():
                if t.data_type == TensorProto.STRING:
                    continue
                if tensors.is_external(t) or tensors.nbytes(t) >= threshold:
                    offset, length = _append_tensor(f, model, t)
                    _point_to(t, location, offset, length)
                    moved.append((t, offset, length))
            f.flush()
            os.fsync(f.fileno())
        tmp_model.write_bytes(_serialize(model, out))
        _fsync_path(tmp_model)
        os.replace(tmp_data, data_path)
        os.replace(tmp_model, out)
    except BaseException:
        _restore_inline(moved, tmp_data if tmp_data.exists() else data_path)
        for tmp in (tmp_data, tmp_model):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    model.base_dir = out.parent.resolve()
    model.source = out.resolve()


def _temp_beside(final: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


def _append_tensor(f, model: Model, t: TensorProto) -> tuple[int, int]:
    pos = f.tell()
    align = 4096 if tensors.nbytes(t) >= 65536 else 64
    pad = (-pos) % align
    if pad:
        f.write(b"\0" * pad)
    offset = f.tell()
    if tensors.is_external(t):
        for chunk in tensors.iter_raw_chunks(model.base_dir, t):
            f.write(chunk)
    elif t.HasField("raw_data"):
        f.write(t.raw_data)
    else:
        f.write(tensors.to_array(t).tobytes())
    return offset, f.tell() - offset


def _point_to(t: TensorProto, location: str, offset: int, length: int) -> None:
    name, dims, dtype, doc = t.name, list(t.dims), t.data_type, t.doc_string
    t.Clear()
    t.name, t.data_type, t.doc_string = name, dtype, doc
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _restore_inline(moved: list[tuple[TensorProto, int, int]], data_file: Path) -> None:
    """Undo an interrupted external save: bring the moved bytes back into the protos."""
    if not moved or not data_file.exists():
        return
    with open(data_file, "rb") as f:
        for t, offset, length in moved:
            f.seek(offset)
            raw = f.read(length)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw


def _refuse_clobbering_sources(model: Model, out: Path, data_path: Path) -> None:
    """Never write over a file the model still reads (an in-place save may rewrite its own data file)."""
    check_not_a_source(model, out)
    in_place = model.source is not None and model.source == out.resolve()
    target = data_path.resolve()
    if target in source_files(model) and not (in_place and target != model.source):
        raise OutputError(
            f"{data_path}: this file holds the input model's data; writing it would destroy the input. "
            "Choose another output name or --external-data-location"
        )


def source_files(model: Model) -> set[Path]:
    """Files the in-memory model still reads from: its external data files and its own file."""
    files = {tensors.resolve_location(model.base_dir, t) for t in model.iter_tensors() if tensors.is_external(t)}
    if model.source is not None:
        files.add(model.source)
    return files


def check_not_a_source(model: Model, out: Path) -> None:
    """Raise OutputError if ``out`` is one of the model's external data files."""
    target = out.resolve()
    data = source_files(model) - ({model.source} if model.source else set())
    if target in data:
        raise OutputError(f"{out}: this file holds the input model's external data; writing it would destroy the input")


def _serialize(model: Model, out: Path) -> bytes:
    try:
        return model.proto.SerializeToString()
    except ValueError as exc:
        raise OutputError(f"{out}: model too large to serialize ({exc}); save with external data") from None


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder; rename it to ``final`` on success, delete it on failure."""
    tmp = _temp_beside(final)
    try:
        yield tmp
        if tmp.exists():
            _fsync_path(tmp)
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
