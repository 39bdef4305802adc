"""Calibration data sources: every source, batching, re-iteration, and every mismatch as a CalibrationError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader

import ogt
from ogt.calib import data
from ogt.calib.data import (
    CalibrationSource,
    check_batch,
    check_source,
    checked,
    folder_source,
    graph_inputs,
    image_folder_source,
    iterable_source,
    limit,
    npz_source,
    open_source,
    parse_input_shapes,
    reader_source,
    synthetic_source,
)
from ogt.errors import CalibrationError
from ogt.testing.equivalence import run

TOKENS = """
<ir_version: 8, opset_import: ["" : 17]>
tokens (int64[batch, seq] ids, bool[batch, seq] mask) => (float[batch, seq] out) {
    f = Cast<to = 1>(ids)
    m = Cast<to = 1>(mask)
    out = Mul(f, m)
}
"""


@pytest.fixture(scope="module")
def demo(demo_path: Path) -> ogt.Model:
    return ogt.load(demo_path)


@pytest.fixture(scope="module")
def tokens() -> ogt.Model:
    return ogt.Model(onnx.parser.parse_model(TOKENS))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def token_batch(n: int, seq: int = 5) -> dict[str, np.ndarray]:
    return {"ids": np.arange(n * seq, dtype=np.int64).reshape(n, seq), "mask": np.ones((n, seq), dtype=bool)}


def sizes(source: CalibrationSource) -> list[int]:
    return [data.batch_len(b) for b in source]


def concat(source: CalibrationSource, name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in source])


# -- graph inputs ------------------------------------------------------------------------------


def test_graph_inputs_skip_initializers(demo, tokens):
    (spec,) = graph_inputs(demo)
    assert (spec.name, spec.dtype, spec.shape) == ("image", np.float32, ("N", 3, 32, 32))
    assert [(s.name, s.dtype) for s in graph_inputs(tokens)] == [("ids", np.int64), ("mask", np.bool_)]


def test_takes_any_batch_only_when_every_first_dim_is_dynamic(demo, tokens):
    assert data.takes_any_batch(demo)  # image: ["N", 3, 32, 32]
    assert data.takes_any_batch(tokens)
    static = ogt.Model(onnx.parser.parse_model(TOKENS.replace("int64[batch, seq] ids", "int64[1, seq] ids")))
    assert not data.takes_any_batch(static)  # a fixed batch of 1 takes one sample per run
    no_shape = ogt.Model(onnx.parser.parse_model(TOKENS.replace("int64[batch, seq] ids", "int64 ids")))
    assert not data.takes_any_batch(no_shape)  # rank unknown: axis 0 may not be a batch


def test_rebatched_regroups_the_same_samples(demo):
    source = data.iterable_source([{"image": images(1, seed=i)} for i in range(7)])
    out = data.rebatched(source, 3)
    assert sizes(out) == [3, 3, 1]
    np.testing.assert_array_equal(concat(out, "image"), concat(source, "image"))
    assert out.num_samples == source.num_samples


# -- .npz ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_batches_and_reiteration(tmp_path, demo, save):
    x = images(5)
    save(tmp_path / "calib.npz", image=x)
    src = npz_source(tmp_path / "calib.npz", batch_size=2)
    check_source(demo, src)
    assert (src.num_samples, src.reiterable) == (5, True)
    assert sizes(src) == [2, 2, 1]
    np.testing.assert_array_equal(concat(src, "image"), x)
    np.testing.assert_array_equal(concat(src, "image"), x)  # a second pass reads the same data


def test_npz_multi_input_non_native_and_fortran_arrays(tmp_path, tokens):
    batch = token_batch(3)
    np.savez(tmp_path / "t.npz", ids=np.asfortranarray(batch["ids"]).astype(">i8"), mask=batch["mask"])
    src = npz_source(tmp_path / "t.npz", batch_size=2)
    for b in src:
        check_batch(tokens, b)
    np.testing.assert_array_equal(concat(src, "ids"), batch["ids"])
    np.testing.assert_array_equal(concat(src, "mask"), batch["mask"])


def test_npz_is_streamed_not_loaded(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "c.npz", image=images(4))
    src = npz_source(tmp_path / "c.npz", batch_size=3)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load reads whole arrays"))
    assert sizes(src) == [3, 1]


def test_npz_arrays_with_different_sample_counts(tmp_path):
    np.savez(tmp_path / "bad.npz", ids=np.zeros((3, 4), np.int64), mask=np.zeros((2, 4), bool))
    with pytest.raises(CalibrationError, match=r"bad\.npz.*different numbers of samples"):
        npz_source(tmp_path / "bad.npz")


def test_npz_missing_corrupt_scalar_object(tmp_path):
    with pytest.raises(CalibrationError, match=r"nope\.npz: no such file"):
        npz_source(tmp_path / "nope.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CalibrationError, match=r"corrupt\.npz: not a readable \.npz"):
        npz_source(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "scalar.npz", image=np.float32(1))
    with pytest.raises(CalibrationError, match=r"scalar\.npz: array 'image' is a scalar"):
        npz_source(tmp_path / "scalar.npz")
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationError, match=r"obj\.npz: array 'image' holds Python objects"):
        npz_source(tmp_path / "obj.npz")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(CalibrationError, match=r"none\.npz: the \.npz file holds no arrays"):
        npz_source(tmp_path / "none.npz")


def test_npz_with_zero_samples_is_empty(tmp_path, demo):
    np.savez(tmp_path / "empty.npz", image=np.zeros((0, 3, 32, 32), np.float32))
    src = npz_source(tmp_path / "empty.npz")
    assert src.num_samples == 0
    with pytest.raises(CalibrationError, match=r"empty\.npz.*yields no batches"):
        check_source(demo, src)


# -- folders of arrays -----------------------------------------------------------------------------


def test_folder_of_npz_rebatches_across_files_in_sorted_order(tmp_path, demo):
    x = images(5)
    np.savez(tmp_path / "b.npz", image=x[3:])
    np.savez(tmp_path / "a.npz", image=x[:3])
    (tmp_path / "notes.txt").write_text("ignored")
    src = folder_source(tmp_path, batch_size=2)
    check_source(demo, src)
    assert src.num_samples == 5
    assert sizes(src) == [2, 2, 1]
    np.testing.assert_array_equal(concat(src, "image"), x)


def test_folder_of_npy_single_input(tmp_path, demo):
    x = images(4)
    for i in range(4):
        np.save(tmp_path / f"sample_{i}.npy", x[i : i + 1])
    src = folder_source(tmp_path, batch_size=3, input_name="image")
    check_source(demo, src)
    assert sizes(src) == [3, 1]
    np.testing.assert_array_equal(concat(src, "image"), x)
    # without input_name an .npy feeds the input named by its stem
    with pytest.raises(CalibrationError, match="'sample_0' is not an input"):
        check_source(demo, folder_source(tmp_path))


def test_folder_streams_files_and_names_the_bad_one(tmp_path, demo):
    np.savez(tmp_path / "a.npz", image=images(2))
    (tmp_path / "b.npz").write_bytes(b"garbage")
    it = iter(folder_source(tmp_path, batch_size=2))
    check_batch(demo, next(it))  # the first file is read before the second is opened
    with pytest.raises(CalibrationError, match=r"b\.npz: not a readable"):
        next(it)


def test_folder_empty_or_missing(tmp_path):
    with pytest.raises(CalibrationError, match=f"{tmp_path}: the folder holds no .npz or .npy"):
        folder_source(tmp_path)
    with pytest.raises(CalibrationError, match=r"missing: no such folder"):
        folder_source(tmp_path / "missing")


# -- images ----------------------------------------------------------------------------------------


@pytest.fixture
def Image():  # the PIL.Image module
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow is a runtime dependency: CI must have it
        pytest.fail(str(exc)) if os.environ.get("CI") else pytest.skip(str(exc))
    return Image


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)


def gradient(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 4, ys * 5, np.full((h, w), 200)], axis=-1)  # < 256 up to 63x51


def test_image_normalisation_layout_and_channel_order(tmp_path, demo, Image):
    pixels = gradient(32, 32)
    write_png(tmp_path / "a.png", pixels)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    want = (pixels / 255.0 - np.array(mean)) / np.array(std)  # HWC, RGB
    nchw = image_folder_source(tmp_path, "image", size=(32, 32), crop="none", mean=mean, std=std)
    (batch,) = list(nchw)
    assert batch["image"].shape == (1, 3, 32, 32) and batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["image"][0], want.transpose(2, 0, 1), rtol=1e-6)
    check_source(demo, nchw)
    bgr = image_folder_source(tmp_path, "x", size=(32, 32), crop="none", mean=mean, std=std, layout="NHWC", channel_order="BGR")
    (batch,) = list(bgr)
    assert batch["x"].shape == (1, 32, 32, 3)
    np.testing.assert_allclose(batch["x"][0], want[..., ::-1], rtol=1e-6)


def test_image_center_crop_and_resize(tmp_path, Image):
    pixels = gradient(6, 10)
    write_png(tmp_path / "a.png", pixels)
    crop = image_folder_source(tmp_path, "x", size=(4, 4), resize=None, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    (batch,) = list(crop)
    np.testing.assert_array_equal(batch["x"][0], pixels[1:5, 3:7].transpose(2, 0, 1))
    resized = image_folder_source(tmp_path, "x", size=(8, 8), resize=12, dtype=np.float16)
    (batch,) = list(resized)  # shorter side 6 -> 12: 20x12, then the central 8x8
    assert batch["x"].shape == (1, 3, 8, 8) and batch["x"].dtype == np.float16
    with pytest.raises(CalibrationError, match=r"a\.png: image is 10x6.*smaller than the 8x8 crop"):
        list(image_folder_source(tmp_path, "x", size=(8, 8), resize=None))


def test_image_formats_batches_and_errors(tmp_path, Image):
    rgb = gradient(40, 48)
    write_png(tmp_path / "1.png", rgb)
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "2.jpg", quality=95)
    Image.fromarray(rgb.astype(np.uint8)).convert("L").save(tmp_path / "3.bmp")
    src = image_folder_source(tmp_path, "x", size=(32, 32), resize=36, batch_size=2)
    assert (src.num_samples, sizes(src)) == (3, [2, 1])
    (tmp_path / "4.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match=r"4\.png: not a readable image"):
        list(image_folder_source(tmp_path, "x", size=(32, 32), resize=36, batch_size=2))
    with pytest.raises(CalibrationError, match="layout"):
        image_folder_source(tmp_path, "x", layout="CHW")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no image files"):
        image_folder_source(empty, "x")


# -- Python iterables and onnxruntime readers ----------------------------------------------------


def test_iterable_list_is_reiterable(demo):
    batches = [{"image": images(2)}, {"image": images(1, seed=1)}]
    src = iterable_source(batches)
    check_source(demo, src)
    assert (src.reiterable, src.num_samples) == (True, 3)
    assert sizes(src) == sizes(src) == [2, 1]


def test_generator_is_one_shot_and_peek_keeps_the_first_batch(demo):
    src = iterable_source(({"image": images(1, seed=i)} for i in range(3)), num_samples=3)
    assert (src.reiterable, src.num_samples) == (False, 3)
    check_source(demo, src)
    got = concat(src, "image")
    np.testing.assert_array_equal(got, np.concatenate([images(1, seed=i) for i in range(3)]))
    with pytest.raises(CalibrationError, match="one-shot and was already consumed"):
        list(src)


class Reader(CalibrationDataReader):
    def __init__(self, n: int):
        self.items = [{"image": images(1, seed=i)} for i in range(n)]
        self.calls = 0
        self.it = iter(self.items)

    def get_next(self):
        self.calls += 1
        return next(self.it, None)


class RewindableReader(Reader):
    def rewind(self):
        self.it = iter(self.items)


def test_reader_source_one_shot(demo):
    reader = Reader(3)
    src = reader_source(reader)
    assert not src.reiterable and src.num_samples is None
    check_source(demo, src)
    assert sizes(src) == [1, 1, 1]
    with pytest.raises(CalibrationError, match="already consumed"):
        list(src)


def test_reader_source_with_rewind_is_reiterable(demo):
    src = reader_source(RewindableReader(3))
    assert src.reiterable
    check_source(demo, src)
    assert sizes(src) == sizes(src) == [1, 1, 1]
    with pytest.raises(CalibrationError, match="not a CalibrationDataReader"):
        reader_source(object())


def test_limit_slices_the_last_batch_and_reads_no_further(tmp_path, demo):
    x = images(5)
    np.savez(tmp_path / "c.npz", image=x)
    src = limit(npz_source(tmp_path / "c.npz", batch_size=2), 3)
    assert (src.num_samples, sizes(src)) == (3, [2, 1])
    np.testing.assert_array_equal(concat(src, "image"), x[:3])
    assert limit(npz_source(tmp_path / "c.npz"), 50).num_samples == 5
    reader = Reader(10)
    one_shot = limit(reader_source(reader), 2)
    check_source(demo, one_shot)
    assert sizes(one_shot) == [1, 1] and reader.calls == 2
    with pytest.raises(CalibrationError, match="at least 1"):
        limit(one_shot, 0)


# -- synthetic -------------------------------------------------------------------------------------


def test_synthetic_from_the_input_spec(demo):
    src = synthetic_source(demo, 5, batch_size=2, seed=3)
    check_source(demo, src)
    assert (src.num_samples, sizes(src)) == (5, [2, 2, 1])
    np.testing.assert_array_equal(concat(src, "image"), concat(src, "image"))  # deterministic
    batch = next(iter(src))
    assert batch["image"].dtype == np.float32 and abs(float(batch["image"].std()) - 1) < 0.1
    assert run(demo, batch)  # onnxruntime accepts it


def test_synthetic_integer_ranges_and_shared_symbols(tokens):
    shapes = parse_input_shapes(["ids:1x16"])
    src = synthetic_source(tokens, 4, input_shapes=shapes, int_ranges={"ids": (5, 9)}, batch_size=4)
    check_source(tokens, src)
    (batch,) = list(src)
    assert batch["ids"].shape == batch["mask"].shape == (4, 16)  # 'seq' of mask follows ids
    assert batch["ids"].dtype == np.int64 and batch["ids"].min() >= 5 and batch["ids"].max() < 9
    assert set(np.unique(batch["ids"])) == {5, 6, 7, 8} and batch["mask"].dtype == np.bool_


def test_synthetic_errors_name_the_input(tokens, demo):
    with pytest.raises(CalibrationError, match=r"input 'ids': dimension 1 \(seq\) is dynamic; set it with --input-shape ids:1x<seq>"):
        synthetic_source(tokens, 2)
    with pytest.raises(CalibrationError, match="input shape for 'idz'.*no such input"):
        synthetic_source(tokens, 2, input_shapes={"idz": (1, 4)})
    with pytest.raises(CalibrationError, match=r"input 'ids': integer range \[5, 5\)"):
        synthetic_source(tokens, 2, input_shapes={"ids": (1, 4)}, int_ranges={"ids": (5, 5)})
    with pytest.raises(CalibrationError, match="input shape for 'image': dimension 1 is 4"):
        synthetic_source(demo, 2, input_shapes={"image": (1, 4, 32, 32)})
    with pytest.raises(CalibrationError, match="disagree on dimension 'seq'"):
        synthetic_source(tokens, 2, input_shapes={"ids": (1, 4), "mask": (1, 5)})


def test_parse_input_shapes():
    assert parse_input_shapes(["image:1x3x224x224", "input:0:2x8"]) == {"image": (1, 3, 224, 224), "input:0": (2, 8)}
    for bad in ["image", "image:", ":1x3", "image:1xx3", "image:1x-3", "image:0x3"]:
        with pytest.raises(CalibrationError, match="input shape"):
            parse_input_shapes([bad])
    with pytest.raises(CalibrationError, match="'a' given twice"):
        parse_input_shapes(["a:1", "a:2"])


# -- checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"images": images(1)}, "input 'images' is not an input of the graph"),
        ({}, "non-empty dict"),
        ({"image": images(1).astype(np.float64)}, "input 'image': dtype float64, the graph expects float32; cast"),
        ({"image": images(1)[0]}, "input 'image': rank 3 .* expects rank 4"),
        ({"image": np.zeros((1, 4, 32, 32), np.float32)}, "input 'image': dimension 1 is 4, the graph expects 3"),
        ({"image": np.zeros((0, 3, 32, 32), np.float32)}, "input 'image': the batch holds 0 samples"),
        ({"image": [[1.0]]}, "input 'image': expected a numpy array"),
    ],
)
def test_check_batch_names_the_input(demo, batch, message):
    with pytest.raises(CalibrationError, match=message):
        check_batch(demo, batch)


def test_check_batch_multi_input(tokens):
    check_batch(tokens, token_batch(2, seq=7))
    with pytest.raises(CalibrationError, match="input 'mask' is missing"):
        check_batch(tokens, {"ids": token_batch(1)["ids"]})
    bad = token_batch(2) | {"mask": np.ones((2, 6), bool)}
    with pytest.raises(CalibrationError, match=r"input 'mask': dimension 1 \('seq'\) is 6, but input 'ids' has 'seq' = 5"):
        check_batch(tokens, bad)


def test_checked_names_a_later_bad_batch(demo):
    src = checked(demo, iterable_source([{"image": images(1)}, {"image": images(1).astype(np.float64)}]))
    it = iter(src)
    next(it)
    with pytest.raises(CalibrationError, match=r"batch 1: input 'image': dtype float64"):
        next(it)


def test_check_source_on_empty_generator(demo):
    with pytest.raises(CalibrationError, match="yields no batches"):
        check_source(demo, iterable_source(iter([])))


# -- open_source (the CLI entry) -------------------------------------------------------------------


def test_open_source_dispatch(tmp_path, demo, Image):
    np.savez(tmp_path / "c.npz", image=images(3))
    assert open_source(tmp_path / "c.npz", demo, batch_size=2).num_samples == 3
    np.save(tmp_path / "one.npy", images(2))
    assert sizes(open_source(tmp_path / "one.npy", demo)) == [1, 1]
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    np.save(arrays / "whatever.npy", images(2))
    check_source(demo, open_source(arrays, demo))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    write_png(pictures / "a.png", gradient(50, 60))
    src = open_source(pictures, demo, batch_size=1)  # size 32x32 and layout follow the model's input
    check_source(demo, src)
    src = open_source(pictures, demo, image_options={"size": (40, 40), "crop": "none"})
    assert next(iter(src))["image"].shape == (1, 3, 40, 40)
    with pytest.raises(CalibrationError, match="unknown image option 'colour'"):
        open_source(pictures, demo, image_options={"colour": "RGB"})


def test_open_source_errors_name_the_path(tmp_path, demo, tokens):
    with pytest.raises(CalibrationError, match=r"missing\.npz: no such file or folder"):
        open_source(tmp_path / "missing.npz", demo)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationError, match=r"data\.csv: calibration data must be"):
        open_source(tmp_path / "data.csv", demo)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="empty: the folder holds no"):
        open_source(empty, demo)
    np.save(empty / "ids.npy", np.zeros((1, 4), np.int64))
    with pytest.raises(CalibrationError, match=r"single-input model.*\['ids', 'mask'\]"):
        open_source(empty, tokens)
