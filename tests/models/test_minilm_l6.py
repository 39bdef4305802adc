"""The all-MiniLM-L6-v2 subjects: L3's interface, the LayerNorm form asked for, sensible embeddings."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import ogt
from ogt.inspect import summarize


@pytest.fixture(scope="module")
def texts_feeds():
    try:
        from models.data import tokenize

        texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
        return tokenize(texts, 24)
    except (ModuleNotFoundError, ImportError) as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(("fixture", "ops", "decomposed"), [("minilm_l6_path", 13, 0), ("minilm_l6_decomposed_path", 0, 13)])
def test_layernorm_form_interface_and_embeddings(fixture, ops, decomposed, texts_feeds, request):
    from models.recipes import MINILM_INPUTS, MINILM_L6_SENTENCE_OUTPUT

    path = request.getfixturevalue(fixture)
    summary = summarize(ogt.load(path))
    assert (summary.layernorm_op, summary.layernorm_decomposed) == (ops, decomposed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(MINILM_INPUTS)
    (emb,) = session.run([MINILM_L6_SENTENCE_OUTPUT], texts_feeds)
    assert emb.shape == (3, 384)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6 > cos[0, 2]  # paraphrases close, unrelated sentences apart


def test_safetensors_reader_matches_the_header(tmp_path):
    import json
    import struct

    from models._minilm import read_safetensors

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], dtype=np.int64)
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes())
    out = read_safetensors(path)
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)
