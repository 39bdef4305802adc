"""Real calibration and evaluation data for the quantization subjects, built offline.

Every function here returns a :class:`DataSplit`: a calibration set and an evaluation set keyed
by the model's input names (samples on axis 0), drawn from disjoint sources, deterministically.
A larger calibration set extends a smaller one (the first 64 of 512 samples are the 64-sample
set), so runs at different sizes calibrate on nested data and evaluate on the same data.

- :func:`imagenet_crops`: random-size crops of photos shipped inside scikit-image
  (``skimage/data/*.png|jpg``, read straight from the package folder with Pillow, so pooch never
  downloads anything) and scikit-learn (``sklearn/datasets/images``), resized to 224x224 and
  normalised with the ImageNet mean and std. Calibration and evaluation crops come from
  different photos.
- :func:`sentences`: English sentences from docstrings of the running Python's standard library
  (read with :mod:`ast`, never imported), tokenized with the all-MiniLM tokenizer. Calibration
  and evaluation sentences come from different modules, and no sentence is in both.
- :func:`digits_data`: scikit-learn's 8x8 digits; calibration from the training split,
  evaluation on the held-out test split the digits CNN never saw.

Heavy imports (Pillow, scikit-learn, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKLEARN_PIP = "pip install scikit-learn==1.9.1"
SKIMAGE_PIP = "pip install scikit-image==0.26.0"
PILLOW_PIP = "pip install pillow==13.0.0"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP_SIZE = 224
CROP_SCALE = (0.2, 1.0)  # fraction of the photo's area a crop covers
CROP_RATIO = (3 / 4, 4 / 3)  # width / height

# (package, file inside it). Different photos for calibration and evaluation: an evaluation
# crop never overlaps a calibration crop. motorcycle_right (the stereo twin of motorcycle_left)
# and the non-photographs (textures, microscopy, text, synthetic images) are left out.
CALIB_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
)
EVAL_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("skimage", "data/camera.png"),
)

SENTENCE_MAX_LENGTH = 64
SENTENCE_WORDS = (6, 40)
EVAL_MODULE_EVERY = 4  # a stdlib module goes to the evaluation pool when crc32(name) % 4 == 0

DIGITS_TEST_SIZE = 360
DIGITS_SEED = 0


@dataclass(frozen=True)
class DataSplit:
    """Calibration and evaluation inputs, keyed by input name, samples on axis 0.

    ``calib_ids`` / ``eval_ids`` say where each sample came from (photo and crop box, sentence
    text, dataset index), one per sample. ``eval_labels`` holds class labels where the data has
    them (digits).
    """

    calib: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    calib_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    eval_labels: np.ndarray | None = None


# --------------------------------------------------------------------------- ImageNet-style crops


def _package_file(package: str, relative: str) -> Path:
    from models.recipes import package_file

    hint = {"skimage": SKIMAGE_PIP, "sklearn": SKLEARN_PIP}[package]
    return package_file(package, relative, hint)


def _import_pillow():  # -> the PIL.Image module
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"imagenet_crops needs Pillow; run: {PILLOW_PIP}") from exc
    return Image


@functools.cache
def _photo(package: str, relative: str):  # -> PIL.Image.Image, RGB
    image_mod = _import_pillow()
    with image_mod.open(_package_file(package, relative)) as im:
        return im.convert("RGB")


def _crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random box covering CROP_SCALE of the area with an aspect ratio in CROP_RATIO."""
    area = width * height * rng.uniform(*CROP_SCALE)
    ratio = float(np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]))))
    w = min(width, max(16, round(np.sqrt(area * ratio))))
    h = min(height, max(16, round(np.sqrt(area / ratio))))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return x0, y0, x0 + w, y0 + h


def _crops(photos: Sequence[tuple[str, str]], n: int, seed: int, stream: int) -> tuple[np.ndarray, list[str]]:
    """``n`` crops, round-robin over ``photos``; sample i depends only on (seed, stream, i)."""
    image_mod = _import_pillow()
    out = np.empty((n, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    ids = []
    for i in range(n):
        package, relative = photos[i % len(photos)]
        photo = _photo(package, relative)
        rng = np.random.default_rng([seed, stream, i])
        box = _crop_box(rng, *photo.size)
        flip = bool(rng.integers(0, 2))
        crop = photo.resize((CROP_SIZE, CROP_SIZE), image_mod.Resampling.BILINEAR, box=box)
        if flip:
            crop = crop.transpose(image_mod.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop, dtype=np.float32) / 255.0
        out[i] = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        ids.append(f"{Path(relative).name}:box={box}:flip={int(flip)}")
    return out, ids


def imagenet_crops(n_calib: int = 64, n_eval: int = 256, seed: int = 0) -> DataSplit:
    """Crops of bundled photos for an ImageNet classifier: input ``input`` [N,3,224,224] float32.

    Calibration crops come from :data:`CALIB_PHOTOS`, evaluation crops from :data:`EVAL_PHOTOS`.
    """
    calib, calib_ids = _crops(CALIB_PHOTOS, n_calib, seed, stream=0)
    evaluation, eval_ids = _crops(EVAL_PHOTOS, n_eval, seed, stream=1)
    return DataSplit({"input": calib}, {"input": evaluation}, tuple(calib_ids), tuple(eval_ids))


# --------------------------------------------------------------------------- sentences


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]:
        return False
    if not (sentence[0].isupper() and sentence.endswith(".") and sentence.isascii()):
        return False
    if any(token in sentence for token in (">>>", "::", "__", "  ")):
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.9 * len(sentence)


def _docstring_sentences(source: str) -> list[str]:
    """Prose sentences from every module, class and function docstring in ``source``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        for paragraph in _PARAGRAPH.split(doc or ""):
            lines = paragraph.splitlines()
            if any(line.startswith((" ", "\t", ">>>")) for line in lines):  # code or a nested list
                continue
            text = " ".join(line.strip() for line in lines)
            found += [s for s in _SENTENCE_END.split(text) if _is_prose(s)]
    return found


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration pool, evaluation pool) of distinct sentences from the stdlib's docstrings.

    Top-level modules of the running interpreter's standard library, read with :mod:`ast`. A
    module goes to the evaluation pool when ``crc32(name) % EVAL_MODULE_EVERY == 0``; a sentence
    that occurs in both pools is dropped from the calibration pool. Each pool is shuffled with a
    fixed seed, so the first N sentences of a pool do not depend on N.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pools: dict[bool, dict[str, None]] = {False: {}, True: {}}  # ordered sets
    for path in sorted(stdlib.glob("*.py")):
        is_eval = zlib.crc32(path.stem.encode()) % EVAL_MODULE_EVERY == 0
        for sentence in _docstring_sentences(path.read_text(encoding="utf-8", errors="replace")):
            pools[is_eval].setdefault(sentence)
    evaluation = list(pools[True])
    calib = [s for s in pools[False] if s not in pools[True]]
    rng = np.random.default_rng(0)
    rng.shuffle(calib)
    rng.shuffle(evaluation)
    return tuple(calib), tuple(evaluation)


def tokenize(texts: Sequence[str], max_length: int = SENTENCE_MAX_LENGTH) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, [N, max_length], padded, truncated)."""
    from models.recipes import minilm_tokenizer

    tokenizer = minilm_tokenizer(max_length)
    encodings = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), max_length),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(
            len(texts), max_length
        ),
    }


def sentences(n_calib: int = 64, n_eval: int = 256, max_length: int = SENTENCE_MAX_LENGTH) -> DataSplit:
    """Tokenized stdlib-docstring sentences for the MiniLM encoder (see :func:`stdlib_sentences`).

    Inputs ``input_ids`` and ``attention_mask``, int64 [N, max_length]; ``*_ids`` hold the text.
    """
    calib_pool, eval_pool = stdlib_sentences()
    if n_calib > len(calib_pool) or n_eval > len(eval_pool):
        raise ValueError(
            f"asked for {n_calib} calibration / {n_eval} evaluation sentences; this Python's "
            f"standard library gives {len(calib_pool)} / {len(eval_pool)}"
        )
    calib, evaluation = calib_pool[:n_calib], eval_pool[:n_eval]
    return DataSplit(tokenize(calib, max_length), tokenize(evaluation, max_length), calib, evaluation)


# --------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's digits as [N,1,8,8] float32 in [0,1], split once with a fixed seed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray  # rows of load_digits()
    test_index: np.ndarray


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """The fixed train/test split: 360 held-out images, the other 1437 for training."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"the digits data needs scikit-learn; run: {SKLEARN_PIP}") from exc
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(y))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return DigitsSplit(x[train], y[train], x[test], y[test], train, test)


def digits_data(n_calib: int = 64, n_eval: int | None = None) -> DataSplit:
    """Calibration: the first ``n_calib`` training images; evaluation: the held-out test split.

    Input ``input`` [N,1,8,8] float32; ``eval_labels`` are the digit classes.
    """
    split = digits_split()
    if n_calib > len(split.y_train):
        raise ValueError(f"asked for {n_calib} calibration images; the training split has {len(split.y_train)}")
    n_eval = len(split.y_test) if n_eval is None else min(n_eval, len(split.y_test))
    return DataSplit(
        {"input": split.x_train[:n_calib]},
        {"input": split.x_test[:n_eval]},
        tuple(f"digits[{i}]" for i in split.train_index[:n_calib]),
        tuple(f"digits[{i}]" for i in split.test_index[:n_eval]),
        eval_labels=split.y_test[:n_eval],
    )
