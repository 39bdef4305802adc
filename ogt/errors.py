"""Error hierarchy. Every error ogt raises on bad input is an :class:`OgtError`.

Each class carries the process exit code the CLI uses for it, so scripts can tell
failures apart without parsing messages.
"""

from __future__ import annotations


class OgtError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for this kind of failure."""

    exit_code = 1


class InputNotFoundError(OgtError):
    """A file the user named does not exist or cannot be read."""

    exit_code = 3


class InvalidModelError(OgtError):
    """The file is not a usable ONNX model (not protobuf, truncated, corrupt)."""

    exit_code = 4


class InvalidGraphError(InvalidModelError):
    """The model parses but its graph is broken (dangling tensor, cycle, duplicate names)."""

    exit_code = 5


class UnsupportedModelError(InvalidModelError):
    """The model uses an opset or IR version this onnx installation does not know."""

    exit_code = 6


class ExternalDataError(InvalidModelError):
    """External tensor data is missing or shorter than the tensor needs."""

    exit_code = 7


class UnsafeModelError(OgtError):
    """The model points outside its own folder (external data escaping via ``..`` or absolute paths)."""

    exit_code = 8


class OutputError(OgtError):
    """Refusing to write: the output would overwrite the input, or cannot be written."""

    exit_code = 9


class TransformError(OgtError):
    """A transform failed. Names the failing transform and the ones that ran before it."""

    exit_code = 10


class CalibrationError(OgtError):
    """Calibration data does not match the graph, or calibration failed."""

    exit_code = 11


class LintError(OgtError):
    """``ogt lint`` found violations of the target's rules."""

    exit_code = 12


class EquivalenceError(AssertionError):
    """Raised by :func:`ogt.testing.assert_equivalent` when two models disagree."""
