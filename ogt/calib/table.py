"""CalibrationTable: per-tensor activation ranges, bound to the graph they were computed on.

The table stores, for each calibrated tensor, the observed min/max and the clipping range the
method chose (``lo``/``hi``). It round-trips through JSON and carries a fingerprint of the
graph (structure, names, shapes, and a sampled digest of every constant), so it is never
applied to another graph by mistake: ``table.check(model)`` raises CalibrationError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..errors import CalibrationError
from ..graph import tensors
from ..graph.io import atomic_file
from ..graph.model import Model

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """Calibration result for one tensor: observed [min, max] and the chosen clip range [lo, hi]."""

    name: str
    lo: float
    hi: float
    min: float
    max: float
    samples: int = 0


@dataclasses.dataclass
class CalibrationTable:
    fingerprint: str
    method: str
    samples: int
    ranges: dict[str, TensorRange]
    options: dict = dataclasses.field(default_factory=dict)

    def range(self, name: str) -> tuple[float, float]:
        r = self.ranges[name]
        return r.lo, r.hi

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def check(self, model: Model) -> None:
        actual = graph_fingerprint(model)
        if actual != self.fingerprint:
            raise CalibrationError(
                f"calibration table was computed on another graph (fingerprint {self.fingerprint[:12]}, "
                f"this graph {actual[:12]}); recalibrate on the model you quantize"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "samples": self.samples,
            "options": self.options,
            "ranges": {k: dataclasses.asdict(v) for k, v in sorted(self.ranges.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CalibrationTable:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT_VERSION:
                raise CalibrationError(f"calibration table format {d.get('format')} is not {FORMAT_VERSION}")
            ranges = {k: TensorRange(**v) for k, v in d["ranges"].items()}
            return cls(d["fingerprint"], d["method"], int(d["samples"]), ranges, d.get("options", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"not a valid ogt calibration table: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationTable:
        return cls.from_json(Path(path).read_text())


def graph_fingerprint(model: Model) -> str:
    """Hash of what calibration depends on: topology, attributes, I/O types, constant values (sampled)."""
    h = hashlib.blake2b(digest_size=20)
    g = model.graph
    for imp in model.proto.opset_import:
        h.update(f"opset {imp.domain} {imp.version};".encode())
    for vi in list(g.input) + list(g.output):
        h.update(vi.name.encode() + vi.type.SerializeToString())
    for node in g.node:
        h.update(f"{node.domain}.{node.op_type}({','.join(node.input)})->({','.join(node.output)});".encode())
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.HasField("t"):
                h.update(a.name.encode() + tensors.sample_digest(a.t, model.base_dir).encode())
            else:
                h.update(a.SerializeToString())
    for t in g.initializer:
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)}:".encode() + tensors.sample_digest(t, model.base_dir).encode())
    return h.hexdigest()
