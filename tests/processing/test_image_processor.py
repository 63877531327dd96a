"""Image processor: bit-exact parity with transformers' PIL path, shape rules, strict errors, config I/O.

The oracle is transformers 5.24 `Idefics2ImageProcessorPil` (docs/numerics.md §5); oracle tests are marked and
skip without transformers. Real photographs come from scikit-image (shipped files, no download).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from idefics2.processing.batch import BatchFeature
from idefics2.processing.image_inputs import make_nested_images
from idefics2.processing.image_ops import resize_output_size, split_boxes
from idefics2.processing.image_processor import DEFAULT_MAX_IMAGE_PIXELS, Idefics2ImageProcessor

skimage_data = pytest.importorskip("skimage.data")


# ----------------------------------------------------------------------------- helpers


@functools.cache
def photo(name: str = "astronaut", width: int | None = None, height: int | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
    return image if width is None else image.resize((width, height), Image.Resampling.BILINEAR)


def with_alpha(image: Image.Image, mode: str = "RGBA") -> Image.Image:
    """Add a diagonal alpha ramp (fully transparent to opaque) so compositing is exercised."""
    w, h = image.size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 255 // max(h + w - 2, 1)).astype(np.uint8)
    base = image.convert("L" if mode == "LA" else "RGB")
    base.putalpha(Image.fromarray(ramp))
    return base


@functools.cache
def reference() -> Any:
    idefics2 = pytest.importorskip("transformers.models.idefics2")
    return idefics2.Idefics2ImageProcessorPil()


def assert_bit_exact(images: Any, ours: Idefics2ImageProcessor | None = None, ref: Any = None, **kwargs: Any):
    """Run both processors; pixel values must be identical bits, masks identical values."""
    ref = ref if ref is not None else reference()
    mine = (ours or Idefics2ImageProcessor())(images, **kwargs)
    theirs = ref(images, return_tensors="pt", **kwargs)
    assert mine["pixel_values"].dtype == torch.float32
    assert mine["pixel_attention_mask"].dtype == torch.int64
    assert mine["pixel_values"].shape == theirs["pixel_values"].shape
    # The reference keeps float64/float16 when the input had it; we always return float32.
    assert torch.equal(mine["pixel_values"], theirs["pixel_values"].to(torch.float32))
    assert torch.equal(mine["pixel_attention_mask"], theirs["pixel_attention_mask"].to(torch.int64))
    return mine


@pytest.mark.oracle
def test_preprocess_is_the_documented_spelling_of_the_call() -> None:
    """`Idefics2ImageProcessor.preprocess`, the spelling of the model's documentation page, is the call."""
    images = [[photo("astronaut", 500, 300)], [photo("chelsea", 200, 410), photo("coffee", 60, 60)]]
    mine = Idefics2ImageProcessor().preprocess(images, do_image_splitting=True, return_tensors="pt")
    theirs = reference().preprocess(images, do_image_splitting=True, return_tensors="pt")
    assert torch.equal(mine["pixel_values"], theirs["pixel_values"].to(torch.float32))
    assert torch.equal(mine["pixel_attention_mask"], theirs["pixel_attention_mask"].to(torch.int64))


def expected_size(height: int, width: int, shortest: int = 378, longest: int = 980) -> tuple[int, int]:
    """Spec §5.4, written independently of the implementation."""
    if width >= height and width > longest:
        height, width = int(longest / (width / height)), longest
    elif height > width and height > longest:
        height, width = longest, int(longest * (width / height))
    return max(height, shortest), max(width, shortest)


# ----------------------------------------------------------------------------- oracle parity

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]


@pytest.mark.oracle
@pytest.mark.parametrize("name", PHOTOS)
def test_real_photographs_match_reference(name: str) -> None:
    assert_bit_exact(photo(name))


# docs/numerics.md §5.4 table: input W×H -> output H×W (the last row is the 5.24 result; 4.57 misread it)
RESIZE_TABLE = [
    ((640, 480), (480, 640)),
    ((2000, 1000), (490, 980)),
    ((1000, 2000), (980, 490)),
    ((700, 1500), (980, 457)),
    ((1200, 1199), (979, 980)),
    ((981, 981), (980, 980)),
    ((300, 200), (378, 378)),
    ((379, 377), (378, 379)),
    ((5000, 379), (378, 980)),
    ((1001, 3), (378, 980)),
]


@pytest.mark.parametrize(("in_wh", "out_hw"), RESIZE_TABLE)
def test_resize_rule_matches_spec_table(in_wh: tuple[int, int], out_hw: tuple[int, int]) -> None:
    size = {"shortest_edge": 378, "longest_edge": 980}
    assert resize_output_size(in_wh[1], in_wh[0], size) == out_hw == expected_size(in_wh[1], in_wh[0])


@pytest.mark.oracle
@pytest.mark.parametrize(("in_wh", "out_hw"), RESIZE_TABLE)
def test_resize_table_images_match_reference(in_wh: tuple[int, int], out_hw: tuple[int, int]) -> None:
    out = assert_bit_exact(photo("coffee", *in_wh))
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, *out_hw)


def test_split_boxes_give_extra_pixel_to_bottom_right() -> None:
    assert split_boxes(481, 641) == [(0, 0, 240, 320), (0, 320, 240, 641), (240, 0, 481, 320),
                                     (240, 320, 481, 641), (0, 0, 481, 641)]  # fmt: skip


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("width", "height", "canvas_hw"),
    [
        (641, 481, (481, 641)),
        (1999, 1001, (491, 980)),
        (5, 3, (378, 378)),
        (2, 2, (378, 378)),
        (379, 377, None),
    ],
)
def test_splitting_odd_sizes_matches_reference(width: int, height: int, canvas_hw: Any) -> None:
    out = assert_bit_exact(photo("rocket", width, height), do_image_splitting=True)
    assert out["pixel_values"].shape[:2] == (1, 5)
    if canvas_hw is not None:
        assert tuple(out["pixel_values"].shape[-2:]) == canvas_hw


def pil_mode_image(mode: str) -> Image.Image:
    base = photo("chelsea")
    if mode in ("RGBA", "LA"):
        return with_alpha(base, mode)
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "I;16":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 3)
    if mode == "F":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 2)
    return base.convert(mode)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "mode", ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "I;16", "1", "I", "F", "YCbCr"]
)
def test_every_pil_mode_matches_reference(mode: str) -> None:
    image = pil_mode_image(mode)
    assert_bit_exact(image)
    assert_bit_exact([image, photo("coffee")], do_image_splitting=True)


@pytest.mark.oracle
def test_three_band_modes_without_conversion_are_read_as_raw_bytes_like_reference() -> None:
    assert_bit_exact(
        [photo("chelsea").convert("YCbCr"), photo("coffee").convert("HSV")], do_convert_rgb=False
    )


def _coffee() -> np.ndarray:
    return np.asarray(photo("coffee"))


ARRAY_CASES = {
    "numpy_hwc_uint8": (lambda: _coffee(), {}),
    "numpy_chw_uint8": (lambda: _coffee().transpose(2, 0, 1), {}),
    "torch_hwc_uint8": (lambda: torch.from_numpy(_coffee().copy()), {}),
    "torch_chw_uint8": (lambda: torch.from_numpy(_coffee().copy()).permute(2, 0, 1), {}),
    "numpy_hwc_float32_unit": (lambda: _coffee().astype(np.float32) / 255, {"do_rescale": False}),
    "numpy_chw_float64_unit": (lambda: _coffee().transpose(2, 0, 1) / 255.0, {"do_rescale": False}),
    "torch_chw_float32_unit": (
        lambda: torch.from_numpy(_coffee().copy()).permute(2, 0, 1).float() / 255,
        {"do_rescale": False},
    ),
    "float32_unit_rescaled_again": (lambda: _coffee().astype(np.float32) / 255, {}),
    "float32_whole_numbers": (lambda: _coffee().astype(np.float32), {}),
    "float32_unit_split": (
        lambda: _coffee().astype(np.float32) / 255,
        {"do_rescale": False, "do_image_splitting": True},
    ),
    "float32_no_resize": (
        lambda: _coffee().astype(np.float32) / 255,
        {"do_rescale": False, "do_resize": False},
    ),
    "float64_no_resize_rescale": (lambda: _coffee().astype(np.float64), {"do_resize": False}),
    "float16_no_resize": (
        lambda: (_coffee() / 255).astype(np.float16),
        {"do_rescale": False, "do_resize": False},
    ),
    "int32_hwc": (lambda: _coffee().astype(np.int32), {}),
    "one_channel_hwc": (lambda: _coffee()[..., :1], {}),
    "one_channel_chw_torch": (lambda: torch.from_numpy(_coffee()[..., 0].copy())[None], {}),
    "four_channel_uint8": (lambda: np.asarray(with_alpha(photo("coffee"))), {}),
    "four_channel_float_unit": (
        lambda: np.asarray(with_alpha(photo("coffee"))) / 255.0,
        {"do_rescale": False},
    ),
    "stack_of_two_nhwc": (lambda: np.stack([_coffee(), _coffee()[::-1]]), {}),
    "list_of_stacks": (lambda: [np.stack([_coffee()]), np.stack([_coffee(), _coffee()])], {}),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_array_and_tensor_inputs_match_reference(case: str) -> None:
    make, kwargs = ARRAY_CASES[case]
    assert_bit_exact(make(), **kwargs)


def _batch(counts: list[int]) -> list[list[Image.Image]]:
    names = iter(PHOTOS * 3)
    return [[photo(next(names)) for _ in range(n)] for n in counts]


@pytest.mark.oracle
@pytest.mark.parametrize("counts", [[0, 3], [1], [1, 3], [1, 0, 3], [0, 1, 3]])
@pytest.mark.parametrize("split", [False, True])
def test_batches_with_0_1_3_images_per_sample_match_reference(counts: list[int], split: bool) -> None:
    out = assert_bit_exact(_batch(counts), do_image_splitting=split)
    per_image = 5 if split else 1
    assert out["pixel_values"].shape[:2] == (len(counts), max(counts) * per_image)
    for b, n in enumerate(counts):  # padding images: all zero, mask all zero
        assert not out["pixel_values"][b, n * per_image :].any()
        assert not out["pixel_attention_mask"][b, n * per_image :].any()


@pytest.mark.oracle
def test_mixed_input_types_in_one_sample_match_reference() -> None:
    assert_bit_exact(
        [[photo("coffee"), _coffee()[::2, ::3], torch.from_numpy(_coffee().copy()).permute(2, 0, 1)]]
    )


SETTINGS_CASES = [
    {"do_normalize": False},
    {"do_rescale": False},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"rescale_factor": 1 / 127.5, "image_mean": 0.25, "image_std": 2.0},
    {"size": {"height": 224, "width": 300}},
    {"size": {"shortest_edge": 100, "longest_edge": 200}, "do_image_splitting": True},
    {"resample": 0},
    {"resample": 1},
    {"resample": 3},
    {"resample": 4},
    {"resample": 5},
    {"do_resize": False},
    {"do_convert_rgb": False},
]


@pytest.mark.oracle
@pytest.mark.parametrize("kwargs", SETTINGS_CASES, ids=[json.dumps(c)[:60] for c in SETTINGS_CASES])
def test_settings_match_reference_as_overrides_and_as_constructor_args(kwargs: dict[str, Any]) -> None:
    images = [[photo("rocket")], [photo("chelsea"), _coffee()]]
    assert_bit_exact(images, **kwargs)
    idefics2 = pytest.importorskip("transformers.models.idefics2")
    assert_bit_exact(
        images, ours=Idefics2ImageProcessor(**kwargs), ref=idefics2.Idefics2ImageProcessorPil(**kwargs)
    )


@pytest.mark.oracle
def test_unpadded_output_is_a_list_per_sample_like_the_reference() -> None:
    images = [[photo("rocket"), photo("coffee")], [], [photo("chelsea")]]
    mine = Idefics2ImageProcessor()(images, do_pad=False, return_tensors="np")
    theirs = reference()(images, do_pad=False, return_tensors=None)
    assert set(mine) == {"pixel_values"}
    assert [len(s) for s in mine["pixel_values"]] == [len(s) for s in theirs["pixel_values"]] == [2, 0, 1]
    for ours_sample, ref_sample in zip(mine["pixel_values"], theirs["pixel_values"], strict=True):
        for a, b in zip(ours_sample, ref_sample, strict=True):
            assert a.dtype == np.float32 and np.array_equal(a, b)
    as_torch = Idefics2ImageProcessor()(images, do_pad=False)
    assert isinstance(as_torch.pixel_values[0][0], torch.Tensor)


@pytest.mark.oracle
def test_numpy_output_matches_reference() -> None:
    images = [[photo("rocket")], [photo("coffee"), photo("chelsea")]]
    mine = Idefics2ImageProcessor()(images, return_tensors="np")
    theirs = reference()(images, return_tensors="np")
    assert isinstance(mine.pixel_values, np.ndarray) and mine.pixel_values.dtype == np.float32
    assert np.array_equal(mine.pixel_values, theirs["pixel_values"])
    assert mine.pixel_attention_mask.dtype == np.int64
    assert np.array_equal(mine.pixel_attention_mask, theirs["pixel_attention_mask"])


@pytest.mark.oracle
def test_explicit_input_data_format_resolves_ambiguous_shapes_like_reference() -> None:
    strip = np.asarray(photo("coffee", 40, 3))  # (3, 40, 3): first and last axis both look like channels
    assert_bit_exact(strip, input_data_format="channels_last")
    assert_bit_exact(strip.transpose(2, 0, 1).copy(), input_data_format="channels_first")


def test_byte_lookup_equals_reference_arithmetic_for_every_byte() -> None:
    byte = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    image = np.repeat(byte, 3, axis=0).transpose(1, 2, 0)  # (16, 16, 3): every byte value once
    out = Idefics2ImageProcessor()(image, do_resize=False, return_tensors="np").pixel_values[0, 0]
    expected = ((byte.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(out, np.repeat(expected, 3, axis=0))


def test_bfloat16_tensors_are_read_as_float32() -> None:
    image = torch.rand(3, 20, 30).to(torch.bfloat16)
    proc = Idefics2ImageProcessor(do_rescale=False)
    assert torch.equal(proc(image).pixel_values, proc(image.float()).pixel_values)


def test_inputs_are_not_modified() -> None:
    arrays = [_coffee()[..., :1].copy(), (_coffee() / 255.0), np.asarray(with_alpha(photo("coffee"))).copy()]
    before = [a.copy() for a in arrays]
    Idefics2ImageProcessor()([[a] for a in arrays], do_rescale=False, do_image_splitting=True)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before, strict=True))


def test_threaded_resizing_gives_the_same_bits_and_the_first_error_in_order(monkeypatch: Any) -> None:
    import idefics2.processing.image_processor as module

    pools = []

    class SpyPool(module.ThreadPoolExecutor):
        def __init__(self, workers: int) -> None:
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(module, "ThreadPoolExecutor", SpyPool)
    images = [[photo(name, 900, 700)] for name in PHOTOS[:4]]
    small = {"size": {"shortest_edge": 100, "longest_edge": 300}}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = Idefics2ImageProcessor()(images, **small)
        torch.set_num_threads(2)
        parallel = Idefics2ImageProcessor()(images, **small)
        bad = [*images, [np.full((700, 900, 3), 0.5)], [np.full((700, 900, 3), 7.5)]]
        with pytest.raises(ValueError, match="sample 5, image 0: float pixels must lie in"):
            Idefics2ImageProcessor()(bad, **small)
    finally:
        torch.set_num_threads(threads)
    assert pools == [2, 2]
    assert torch.equal(serial.pixel_values, parallel.pixel_values)
    assert torch.equal(serial.pixel_attention_mask, parallel.pixel_attention_mask)


def test_attribute_changes_and_overrides_apply_per_call_only() -> None:
    proc = Idefics2ImageProcessor()
    image = photo("coffee")
    assert proc(image, do_image_splitting=True).pixel_values.shape[1] == 5
    assert proc(image).pixel_values.shape[1] == 1
    proc.do_image_splitting = True
    assert proc(image).pixel_values.shape[1] == 5
    proc.size = 378  # attributes are validated at call time too
    with pytest.raises(ValueError, match="size must be"):
        proc(image)


# ----------------------------------------------------------------------------- structure and errors


def test_make_nested_images_accepts_the_documented_structures() -> None:
    a, b = photo("coffee"), _coffee()
    assert make_nested_images(a) == [[a]]
    assert make_nested_images([a, b])[0][0] is a
    assert make_nested_images([[], [a, b]])[0] == []
    assert len(make_nested_images(np.stack([b, b]))[0]) == 2
    assert [len(s) for s in make_nested_images([np.stack([b]), np.stack([b, b])])] == [1, 2]
    assert [len(s) for s in make_nested_images(([a], (b, a)))] == [1, 2]


IMG = np.zeros((8, 10, 3), np.uint8)
ERROR_CASES = {
    "zero_size_pil": (Image.new("RGB", (0, 5)), {}, r"sample 0, image 0: image has zero size"),
    "zero_size_array": (
        [[IMG], [np.zeros((0, 5, 3), np.uint8)]],
        {},
        r"sample 1, image 0: image has zero size",
    ),
    "ambiguous_channel_axis": (
        np.zeros((3, 10, 3), np.uint8),
        {},
        r"cannot infer the channel axis.*input_data_format",
    ),
    "no_channel_axis": (np.zeros((5, 7, 9), np.uint8), {}, r"no channel axis of size 1, 3 or 4"),
    "two_channels": (np.zeros((5, 7, 2), np.uint8), {}, r"no channel axis"),
    "2d_array": ([IMG, np.zeros((8, 10), np.uint8)], {}, r"sample 0, image 1: 2-D array .* no channel axis"),
    "5d_array": (np.zeros((1, 1, 8, 10, 3), np.uint8), {}, r"expected a 3-D array"),
    "list_of_list_of_list": ([[[IMG]]], {}, r"sample 0, image 0: got a list; images nest at most two levels"),
    "string_alone": ("http://example.com/cat.png", {}, r"string .*URLs and paths are not loaded"),
    "string_in_sample": ([[IMG, "cat.png"]], {}, r"sample 0, image 1: expected an image, got a string"),
    "string_in_flat_list": ([IMG, IMG, "x"], {}, r"sample 0, image 2: expected an image, got a string"),
    "none": (None, {}, r"expected an image or a list of images, got NoneType"),
    "dict_in_sample": ([[IMG], [{"a": 1}]], {}, r"sample 1, image 0: expected an image, got dict"),
    "mixed_nesting": ([IMG, [IMG]], {}, r"element 0 of the image list is not a list while element 1 is"),
    "empty_list": ([], {}, r"empty list of images"),
    "all_samples_empty": ([[], []], {}, r"no images in the batch"),
    "nan": ([[IMG], [np.full((8, 10, 3), np.nan, np.float32)]], {}, r"sample 1, image 0: .*NaN or infinite"),
    "inf": (np.full((8, 10, 3), np.inf), {"do_resize": False}, r"NaN or infinite"),
    "over_pixel_limit": (
        [[IMG, IMG]],
        {"max_image_pixels": 79},
        r"sample 0, image 0: 10x8 image has 80 pixels.*raise it",
    ),
    "resize_target_over_limit": (
        IMG,
        {"max_image_pixels": 100},
        r"resizing to 378x378 exceeds max_image_pixels",
    ),
    "float_out_of_range_for_resize": (np.full((8, 10, 3), 1.5), {}, r"float pixels must lie in \[0, 1\]"),
    "negative_integers": (
        np.full((8, 10, 3), -1, np.int16),
        {},
        r"integer image values must lie in \[0, 255\]",
    ),
    "complex_dtype": (np.zeros((8, 10, 3), np.complex64), {}, r"unsupported dtype complex64"),
    "bool_dtype": (np.zeros((8, 10, 3), bool), {}, r"unsupported dtype bool"),
    "too_small_to_split": (
        [[IMG], [Image.new("RGB", (9, 1))]],
        {"do_image_splitting": True},
        r"sample 1, image 0: a 9x1 image cannot be split",
    ),
    "rgba_without_conversion": (Image.new("RGBA", (4, 4)), {"do_convert_rgb": False}, r"not 3-channel 8-bit"),
    "gray_array_without_conversion": (
        np.zeros((8, 10, 1), np.uint8),
        {"do_convert_rgb": False},
        r"1-channel array",
    ),
    "float_rgba_out_of_range": (np.full((8, 10, 4), 2.0), {}, r"RGBA values must lie in \[0, 1\]"),
    "unconvertible_pil_mode": (
        Image.new("La", (4, 4)),
        {},
        r"sample 0, image 0: cannot convert PIL mode 'La' to RGB",
    ),
    "bad_input_data_format": (IMG, {"input_data_format": "HWC"}, r"input_data_format must be one of"),
    "size_one_key": (IMG, {"size": {"shortest_edge": 378}}, r"size must be"),
    "size_extra_key": (IMG, {"size": {"height": 5, "width": 5, "depth": 1}}, r"size must be"),
    "size_not_dict": (IMG, {"size": 378}, r"size must be"),
    "size_zero": (IMG, {"size": {"height": 0, "width": 5}}, r"positive integers"),
    "size_float": (IMG, {"size": {"height": 5.5, "width": 5}}, r"positive integers"),
    "size_bool": (IMG, {"size": {"height": True, "width": 5}}, r"positive integers"),
    "size_inverted": (IMG, {"size": {"shortest_edge": 900, "longest_edge": 300}}, r"must not exceed"),
    "unknown_option": (IMG, {"do_magic": True}, r"unknown image processor option\(s\) \['do_magic'\]"),
    "flag_not_bool": (IMG, {"do_pad": 1}, r"do_pad must be a bool"),
    "bad_resample": (IMG, {"resample": 9}, r"resample must be"),
    "bad_rescale_factor": (IMG, {"rescale_factor": float("nan")}, r"rescale_factor must be"),
    "bad_mean_length": (IMG, {"image_mean": [0.5, 0.5]}, r"image_mean must be"),
    "zero_std": (IMG, {"image_std": [0.5, 0.0, 0.5]}, r"image_std must be a non-zero"),
    "bad_pixel_limit": (IMG, {"max_image_pixels": 0}, r"max_image_pixels must be"),
    "bad_return_tensors": (IMG, {"return_tensors": "tf"}, r"return_tensors must be"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_value_error_with_a_clear_message(case: str) -> None:
    images, kwargs, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        Idefics2ImageProcessor()(images, **kwargs)


def test_invalid_constructor_settings_raise() -> None:
    with pytest.raises(ValueError, match="size must be"):
        Idefics2ImageProcessor(size={"longest_edge": 980})
    with pytest.raises(ValueError, match="do_image_splitting must be a bool"):
        Idefics2ImageProcessor(do_image_splitting="yes")


def test_pixel_limit_defaults_to_pillows_and_can_be_raised_or_disabled() -> None:
    assert Idefics2ImageProcessor().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    small = Idefics2ImageProcessor(max_image_pixels=80, do_resize=False)
    assert small(IMG).pixel_values.shape == (1, 1, 3, 8, 10)
    with pytest.raises(ValueError, match="81 pixels"):
        small(np.zeros((9, 9, 3), np.uint8))
    assert small(np.zeros((9, 9, 3), np.uint8), max_image_pixels=None).pixel_values.shape[-1] == 9


# ----------------------------------------------------------------------------- properties

PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK"]


@st.composite
def pil_batches(draw: st.DrawFn) -> tuple[list[list[Image.Image]], dict[str, Any]]:
    split = draw(st.booleans())
    low = 2 if split else 1
    shortest = draw(st.integers(3, 12))
    kwargs = {
        "do_image_splitting": split,
        "size": {"shortest_edge": shortest, "longest_edge": draw(st.integers(shortest, 24))},
    }
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = []
    for _ in range(draw(st.integers(1, 3))):
        sample = []
        for _ in range(draw(st.integers(0, 3))):
            h, w = draw(st.integers(low, 40)), draw(st.integers(low, 40))
            rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
            sample.append(rgba.convert(draw(st.sampled_from(PIL_MODES))))
        batch.append(sample)
    assume(any(batch))
    return batch, kwargs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pil_batches())
def test_output_shapes_and_masks_follow_the_rules(
    case: tuple[list[list[Image.Image]], dict[str, Any]],
) -> None:
    batch, kwargs = case
    out = Idefics2ImageProcessor()(batch, **kwargs)
    size = kwargs["size"]
    sizes = []  # per sample: output (h, w) of every sub-image, in order
    for sample in batch:
        sub = []
        for image in sample:
            h, w = image.height, image.width
            boxes = [
                (h // 2, w // 2),
                (h // 2, w - w // 2),
                (h - h // 2, w // 2),
                (h - h // 2, w - w // 2),
                (h, w),
            ]
            for bh, bw in boxes if kwargs["do_image_splitting"] else [(h, w)]:
                sub.append(expected_size(bh, bw, size["shortest_edge"], size["longest_edge"]))
        sizes.append(sub)
    all_sizes = [hw for sub in sizes for hw in sub]
    B, M = len(batch), max(len(sub) for sub in sizes)
    H, W = max(h for h, _ in all_sizes), max(w for _, w in all_sizes)
    assert out.pixel_values.shape == (B, M, 3, H, W)
    assert out.pixel_attention_mask.shape == (B, M, H, W)
    for b, sub in enumerate(sizes):
        for k in range(M):
            h, w = sub[k] if k < len(sub) else (0, 0)
            mask = out.pixel_attention_mask[b, k]
            assert int(mask.sum()) == h * w and bool(mask[:h, :w].all())
            outside = out.pixel_values[b, k].clone()
            outside[:, :h, :w] = 0
            assert not outside.any()


@pytest.mark.oracle
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pil_batches())
def test_random_pil_batches_match_reference(case: tuple[list[list[Image.Image]], dict[str, Any]]) -> None:
    batch, kwargs = case
    assert_bit_exact(batch, **kwargs)


_DTYPES = [
    np.uint8,
    np.int16,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
    np.object_,
]


@st.composite
def garbage_arrays(draw: st.DrawFn) -> Any:
    rank = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 5]))  # mostly 3-D, the valid rank
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5]), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(_DTYPES))
    fill = draw(st.sampled_from(["unit", "bytes", 0, 1, 255, -3, 1e9, np.nan, np.inf]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    with np.errstate(all="ignore"):
        try:
            values = {"unit": rng.random(shape), "bytes": rng.integers(0, 256, shape)}.get(
                fill, np.full(shape, fill)
            )
            array = values.astype(dtype)
        except (ValueError, OverflowError, TypeError):
            array = np.zeros(shape, dtype)
    if draw(st.booleans()) and array.dtype.kind in "uifb":
        tensor = torch.from_numpy(array.copy())
        return tensor.to(torch.bfloat16) if draw(st.booleans()) and array.dtype.kind == "f" else tensor
    return array


_GARBAGE_MODES = ["RGB", "RGBA", "L", "LA", "La", "P", "PA", "1", "I", "I;16", "F", "CMYK", "RGBa", "YCbCr"]
garbage_leaves = st.one_of(
    garbage_arrays(),
    st.builds(
        lambda m, w, h: Image.new(m, (w, h)),
        st.sampled_from(_GARBAGE_MODES),
        st.integers(0, 5),
        st.integers(0, 5),
    ),
    st.text(max_size=8),
    st.none(),
    st.integers(),
    st.floats(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
garbage_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 30),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.floats(), max_size=4),
    st.dictionaries(
        st.sampled_from(["height", "width", "shortest_edge", "longest_edge", "x"]),
        st.one_of(st.integers(-2, 30), st.floats(), st.booleans()),
        max_size=3,
    ),
)
garbage_overrides = st.dictionaries(
    st.sampled_from(
        [
            "do_image_splitting",
            "do_resize",
            "do_rescale",
            "do_pad",
            "do_convert_rgb",
            "size",
            "resample",
            "image_mean",
            "image_std",
            "rescale_factor",
            "max_image_pixels",
            "return_tensors",
            "input_data_format",
            "bogus",
        ]
    ),
    st.one_of(
        st.booleans(), garbage_values, st.sampled_from(["np", "pt", "channels_first", "channels_last"])
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(garbage_leaves, lambda children: st.lists(children, max_size=3), max_leaves=6),
    garbage_overrides,
)
def test_garbage_input_raises_nothing_but_value_error(images: Any, overrides: dict[str, Any]) -> None:
    try:
        out = Idefics2ImageProcessor()(images, **overrides)
    except ValueError:
        return
    assert isinstance(out, BatchFeature) and "pixel_values" in out


# ----------------------------------------------------------------------------- config I/O


CUSTOM = {
    "do_image_splitting": True,
    "size": {"shortest_edge": 100, "longest_edge": 200},
    "resample": 3,
    "image_mean": [0.4, 0.5, 0.6],
    "image_std": [0.2, 0.25, 0.3],
    "rescale_factor": 1 / 256,
}


def test_to_dict_survives_a_json_round_trip() -> None:
    proc = Idefics2ImageProcessor(**CUSTOM, max_image_pixels=10**6)
    config = json.loads(json.dumps(proc.to_dict()))
    assert Idefics2ImageProcessor.from_dict(config).to_dict() == proc.to_dict()
    assert config["rescale_factor"] == 1 / 256 and config["max_image_pixels"] == 10**6


def test_from_dict_drops_bookkeeping_keys_and_logs_unknown_ones(caplog: pytest.LogCaptureFixture) -> None:
    config = {
        **CUSTOM,
        "image_processor_type": "Idefics2ImageProcessor",
        "processor_class": "Idefics2Processor",
    }
    with caplog.at_level(logging.WARNING):
        assert (
            Idefics2ImageProcessor.from_dict(config).to_dict() == Idefics2ImageProcessor(**CUSTOM).to_dict()
        )
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        Idefics2ImageProcessor.from_dict({"do_pad": False, "mystery": 1})
    assert "mystery" in caplog.text


def test_from_pretrained_reads_both_layouts_and_reports_missing_files(tmp_path: Any) -> None:
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "processor_config.json").write_text(
        json.dumps({"image_processor": CUSTOM, "image_seq_len": 64})
    )
    assert (
        Idefics2ImageProcessor.from_pretrained(tmp_path / "v5").to_dict()
        == Idefics2ImageProcessor(**CUSTOM).to_dict()
    )
    Idefics2ImageProcessor(**CUSTOM).save_pretrained(tmp_path / "v4")
    saved = json.loads((tmp_path / "v4" / "preprocessor_config.json").read_text())
    assert (
        saved["image_processor_type"] == "Idefics2ImageProcessor"
        and saved["processor_class"] == "Idefics2Processor"
    )
    assert Idefics2ImageProcessor.from_pretrained(tmp_path / "v4").do_image_splitting is True
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Idefics2ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
    with pytest.raises(ValueError, match="no 'image_processor' entry"):
        Idefics2ImageProcessor.from_pretrained(tmp_path)


@pytest.mark.oracle
def test_transformers_loads_what_we_save_and_produces_the_same_output(tmp_path: Any) -> None:
    idefics2 = pytest.importorskip("transformers.models.idefics2")
    ours = Idefics2ImageProcessor(**CUSTOM)
    ours.save_pretrained(tmp_path)
    theirs = idefics2.Idefics2ImageProcessorPil.from_pretrained(tmp_path)
    assert theirs.do_image_splitting is True and theirs.resample == 3
    assert_bit_exact([[photo("coffee")], [photo("rocket"), photo("chelsea")]], ours=ours, ref=theirs)


@pytest.mark.oracle
def test_we_load_transformers_saved_configs_in_both_layouts(tmp_path: Any) -> None:
    idefics2 = pytest.importorskip("transformers.models.idefics2")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    theirs = idefics2.Idefics2ImageProcessorPil(**CUSTOM)
    theirs.save_pretrained(tmp_path / "image")
    assert_bit_exact(
        photo("coffee"), ours=Idefics2ImageProcessor.from_pretrained(tmp_path / "image"), ref=theirs
    )

    vocab = {
        t: i
        for i, t in enumerate(
            ["<unk>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"]
        )
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>", "<fake_token_around_image>", "<end_of_utterance>"],
    )
    idefics2.Idefics2Processor(image_processor=theirs, tokenizer=tokenizer).save_pretrained(tmp_path / "full")
    assert not (
        tmp_path / "full" / "preprocessor_config.json"
    ).exists()  # 5.x: nested in processor_config.json
    loaded = Idefics2ImageProcessor.from_pretrained(tmp_path / "full")
    assert loaded.to_dict() == Idefics2ImageProcessor(**CUSTOM).to_dict()


# ----------------------------------------------------------------------------- BatchFeature


def test_batch_feature_gives_attribute_access_and_moves_only_float_tensors_to_a_dtype() -> None:
    batch = BatchFeature(
        pixel_values=torch.zeros(2, 3),
        mask=torch.ones(2, dtype=torch.int64),
        nested=[torch.zeros(1)],
        text="kept",
    )
    assert batch.pixel_values is batch["pixel_values"]
    assert batch.to(torch.float16) is batch
    assert batch.pixel_values.dtype == torch.float16 and batch.mask.dtype == torch.int64
    assert batch.nested[0].dtype == torch.float16 and batch.text == "kept"
    batch.to("cpu", dtype=torch.float32)
    assert batch.pixel_values.dtype == torch.float32 and batch.pixel_values.device.type == "cpu"
    with pytest.raises(AttributeError, match="no key 'missing'"):
        _ = batch.missing


@pytest.mark.oracle
def test_from_dict_overrides_and_json_load_in_transformers(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    size = {"longest_edge": 490, "shortest_edge": 200}
    ours = Idefics2ImageProcessor.from_dict({"do_image_splitting": False, "image_processor_type": "x"},
                                            do_image_splitting=True, size=size)
    assert ours.do_image_splitting and ours.size == size
    with pytest.raises(ValueError, match=r"unknown image processor option\(s\) \['resize'\]"):
        Idefics2ImageProcessor.from_dict({}, resize=True)
    ours.to_json_file(tmp_path / "preprocessor_config.json")
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == json.loads(ours.to_json_string())
    theirs = transformers.models.idefics2.Idefics2ImageProcessorPil.from_pretrained(tmp_path)
    assert theirs.do_image_splitting and theirs.size.longest_edge == 490
    again = Idefics2ImageProcessor.from_pretrained(tmp_path, do_image_splitting=False)
    assert not again.do_image_splitting and again.size == ours.size
