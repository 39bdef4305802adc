"""Generate the bundled demo model ``models/demo/tiny_cnn.onnx`` deterministically.

A tiny CNN (input ``image`` [N,3,32,32] float, output ``logits`` [N,10], opset 17)
built with ``onnx.helper`` from a fixed seed, so re-running this script rewrites
the committed file byte for byte. It is shaped to exercise BatchNorm folding and
graph cleanup:

* three Conv -> BatchNormalization -> Relu stages (with and without conv bias);
  the second conv's weight lives in a ``Constant`` node, not an initializer;
* an ``Identity`` node between stages one and two;
* a BatchNormalization after a Relu (no producer to fold it into);
* ConvTranspose(group=2) -> BatchNormalization;
* GlobalAveragePool -> Flatten -> Gemm(transB=1) -> BatchNormalization on [N,C],
  whose output is the graph output;
* one dead node (output unused) and one unused initializer.

Usage::

    python -m models.make_demo [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

SEED = 20240617
OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 10
DEFAULT_PATH = Path(__file__).resolve().parent / "demo" / "tiny_cnn.onnx"


class _GraphBuilder:
    """Accumulates nodes and initializers; draws all random values from one seeded RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        """Add a float32 initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        """Add a node named after its output and return the output name."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_node", **attrs))
        return output

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        """He-initialised weight so activations keep a sensible scale."""
        w: np.ndarray = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return w

    def bias(self, channels: int) -> np.ndarray:
        """Small random bias."""
        return 0.1 * self.rng.standard_normal(channels)

    def batchnorm(self, x: str, prefix: str, channels: int, eps: float, out: str | None = None) -> str:
        """Add an inference BatchNormalization with random gamma/beta/mean and positive var."""
        params = {
            "scale": self.rng.uniform(0.5, 1.5, channels),
            "bias": 0.1 * self.rng.standard_normal(channels),
            "mean": 0.1 * self.rng.standard_normal(channels),
            "var": self.rng.uniform(0.5, 2.0, channels),
        }
        inputs = [x] + [self.init(f"{prefix}.{key}", value) for key, value in params.items()]
        return self.node("BatchNormalization", inputs, out or prefix, epsilon=eps)


def _conv_stages(g: _GraphBuilder, x: str) -> str:
    """Three Conv -> BN -> Relu stages; Identity after stage 1; Constant weight + dead node in stage 2."""
    k3 = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    w1 = g.init("conv1.weight", g.weight((8, 3, 3, 3), 27))
    x = g.node("Conv", [x, w1, g.init("conv1.bias", g.bias(8))], "conv1", **k3)
    x = g.node("Relu", [g.batchnorm(x, "bn1", 8, 1e-5)], "relu1")
    x = g.node("Identity", [x], "identity1")

    w2 = numpy_helper.from_array(g.weight((12, 8, 3, 3), 72).astype(np.float32), "conv2.weight")
    g.node("Constant", [], "conv2.weight", value=w2)
    x = g.node("Conv", [x, "conv2.weight"], "conv2", strides=[2, 2], **k3)
    x = g.node("Relu", [g.batchnorm(x, "bn2", 12, 1e-3)], "relu2")
    g.node("Sigmoid", [x], "dead_sigmoid")  # output consumed by nothing

    w3 = g.init("conv3.weight", g.weight((16, 12, 3, 3), 108))
    x = g.node("Conv", [x, w3, g.init("conv3.bias", g.bias(16))], "conv3", **k3)
    return g.node("Relu", [g.batchnorm(x, "bn3", 16, 1e-4)], "relu3")


def _upsample_stage(g: _GraphBuilder, x: str) -> str:
    """BN after a Relu, then ConvTranspose(group=2, stride 2) -> BN: [N,16,16,16] -> [N,8,32,32]."""
    x = g.batchnorm(x, "bn_after_relu", 16, 2e-5)
    w = g.init("deconv.weight", g.weight((16, 4, 2, 2), 32))
    attrs = {"group": 2, "kernel_shape": [2, 2], "strides": [2, 2]}
    x = g.node("ConvTranspose", [x, w, g.init("deconv.bias", g.bias(8))], "deconv", **attrs)
    return g.batchnorm(x, "bn_deconv", 8, 1e-2)


def _head(g: _GraphBuilder, x: str) -> str:
    """GlobalAveragePool -> Flatten -> Gemm(transB=1) -> 1-D BN producing ``logits``."""
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    w = g.init("fc.weight", g.weight((NUM_CLASSES, 8), 8))
    x = g.node("Gemm", [x, w, g.init("fc.bias", g.bias(NUM_CLASSES))], "fc", transB=1)
    return g.batchnorm(x, "bn_fc", NUM_CLASSES, 1e-3, out="logits")


def build_demo(seed: int = SEED) -> onnx.ModelProto:
    """Build the tiny demo CNN as an ``onnx.ModelProto`` (deterministic for a given seed)."""
    g = _GraphBuilder(seed)
    logits = _head(g, _upsample_stage(g, _conv_stages(g, "image")))
    g.init("unused.weight", g.rng.standard_normal((4, 4)))
    graph = helper.make_graph(
        g.nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        g.initializers,
        doc_string="ogt demo model; generated by models/make_demo.py",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="ogt.models.make_demo",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_demo(path: Path = DEFAULT_PATH, seed: int = SEED) -> Path:
    """Build the demo model and write it atomically to ``path``."""
    data = build_demo(seed).SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("wrote %s (%d bytes)", path, len(data))
    return path


def verify_demo(path: Path = DEFAULT_PATH, batch: int = 3) -> np.ndarray:
    """Check the file with the ONNX checker and run it in onnxruntime; return the logits."""
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the unused initializer is deliberate; skip ORT's warning
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    logits: np.ndarray = session.run(["logits"], {"image": image})[0]
    if logits.shape != (batch, NUM_CLASSES) or not np.all(np.isfinite(logits)):
        raise ValueError(f"demo model produced bad logits: shape {logits.shape}")
    return logits


def main(argv: list[str] | None = None) -> int:
    """Write and verify the demo model; print its path and size."""
    parser = argparse.ArgumentParser(prog="python -m models.make_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="output path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = write_demo(args.out)
    verify_demo(path)
    print(f"{path}\t{path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
