"""The one layer that knows ONNX protobuf details: io, queries, builders, names, validation."""

from .io import load, save
from .model import Model

__all__ = ["Model", "load", "save"]
