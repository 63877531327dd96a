"""The processor surface that transformers' own Idefics2 tests exercise, checked against transformers 5.24.

Each test builds ours and the reference from the same hub-like fixture and compares what the upstream
tests assert: config files (`to_dict`, `to_json_*`, `from_json_file`, what `save_pretrained` returns),
tokenizer init keywords (`padding_side`, `model_max_length`, the `padding`/`max_length` call defaults),
the 5.x processor kwargs forms (flat, `text_kwargs`, `images_kwargs`, `common_kwargs`) and a negative
`rescale_factor`. The prompts end with their image: no text follows a special token, where the 4.x
segmentation we keep and 5.24's differ (README, exactness), so our ids are the reference's too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HUB_LIKE_TOKENIZER
from idefics2.processing.image_processor import Idefics2ImageProcessor
from idefics2.processing.processor import Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer

pytestmark = pytest.mark.oracle
transformers = pytest.importorskip("transformers")
SEQ = 2
TEXTS = ["lower newer <image>", "upper older longer string <image>"]
# Not 1/255: a different factor, mean and size expose a setting that is dropped on the way.
CUSTOM = {"do_image_splitting": True, "size": {"shortest_edge": 40, "longest_edge": 90},
          "rescale_factor": 1 / 127.5, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3]}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 70), (52, 41))]


def _ours(**kwargs: Any) -> Idefics2Processor:
    return Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER, image_seq_len=SEQ, **kwargs)


def _theirs(**kwargs: Any) -> Any:
    return transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER, image_seq_len=SEQ, **kwargs)


def _their_image_processor(**settings: Any) -> Any:
    return transformers.models.idefics2.Idefics2ImageProcessorPil(**settings)


def _same_outputs(ours: Any, theirs: Any) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        expected = torch.as_tensor(np.asarray(theirs[key]))
        torch.testing.assert_close(torch.as_tensor(ours[key]), expected.to(torch.as_tensor(ours[key]).dtype),
                                   rtol=0, atol=0, msg=key)


def _without_pixel_limit(config: dict[str, Any]) -> dict[str, Any]:
    """Our one extra setting (`max_image_pixels`) dropped, as JSON reads it (the reference keeps tuples)."""
    return json.loads(json.dumps({key: value for key, value in config.items() if key != "max_image_pixels"}))


# ---------------------------------------------------------------- image processor config files
def test_image_processor_json_files_round_trip_both_ways(tmp_path: Path) -> None:
    ours, theirs = Idefics2ImageProcessor(**CUSTOM), _their_image_processor(**CUSTOM)
    assert _without_pixel_limit(ours.to_dict()) == _without_pixel_limit(theirs.to_dict())
    ours.to_json_file(tmp_path / "ours.json")
    theirs.to_json_file(tmp_path / "theirs.json")
    assert Idefics2ImageProcessor.from_json_file(tmp_path / "theirs.json").to_dict() == ours.to_dict()
    assert Idefics2ImageProcessor.from_json_file(tmp_path / "ours.json").to_dict() == ours.to_dict()
    assert _without_pixel_limit(type(theirs).from_json_file(tmp_path / "ours.json").to_dict()) == (
        _without_pixel_limit(theirs.to_dict()))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an image processor config"):
        Idefics2ImageProcessor.from_json_file(tmp_path / "list.json")


def test_image_processor_save_pretrained_returns_the_saved_files(tmp_path: Path) -> None:
    ours = Idefics2ImageProcessor(**CUSTOM).save_pretrained(tmp_path / "ours")
    theirs = _their_image_processor(**CUSTOM).save_pretrained(tmp_path / "theirs")
    assert [Path(f).name for f in ours] == [Path(f).name for f in theirs] == ["preprocessor_config.json"]
    assert Idefics2ImageProcessor.from_pretrained(tmp_path / "ours").to_dict() == Idefics2ImageProcessor(
        **CUSTOM).to_dict()


@pytest.mark.parametrize("factor", [-1, -1.0, -0.5, 0.0])
def test_any_finite_rescale_factor_is_used_like_the_reference(factor: float) -> None:
    """transformers' kwargs tests mark a changed default with rescale_factor=-1 and read the sign."""
    image = _images()[0]
    ours = Idefics2ImageProcessor(rescale_factor=factor)(image)
    theirs = _their_image_processor(rescale_factor=factor)(image, return_tensors="pt")
    _same_outputs(ours, theirs)
    per_call = Idefics2ImageProcessor()(image, rescale_factor=factor)
    torch.testing.assert_close(per_call["pixel_values"], ours["pixel_values"], rtol=0, atol=0)
    if factor < 0:
        assert ours["pixel_values"][0, 0][:, :30, :70].mean() < 0


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), "0.5", True])
def test_a_rescale_factor_that_is_not_a_finite_number_is_refused(factor: Any) -> None:
    with pytest.raises(ValueError, match="rescale_factor must be a finite number"):
        Idefics2ImageProcessor(rescale_factor=factor)


# ---------------------------------------------------------------- tokenizer init keywords
def test_tokenizer_init_settings_match_transformers() -> None:
    kwargs = {"padding_side": "right", "truncation_side": "left", "model_max_length": 4}
    ours = Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER, **kwargs)
    theirs = transformers.AutoTokenizer.from_pretrained(HUB_LIKE_TOKENIZER, **kwargs)
    assert (ours.padding_side, ours.truncation_side, ours.model_max_length) == ("right", "left", 4)
    batch = ["Hello world how are you", "a"]
    assert ours(batch, padding=True, truncation=True) == dict(theirs(batch, padding=True, truncation=True))
    assert ours(batch, padding=True, padding_side="left") == dict(theirs(batch, padding=True, padding_side="left"))


def test_tokenizer_call_defaults_wait_for_the_processor_and_are_saved(tmp_path: Path) -> None:
    """transformers keeps `padding`/`max_length` given at init for processors; its own calls ignore them."""
    kwargs = {"padding": "max_length", "max_length": 17, "truncation": True}
    ours = Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER, **kwargs)
    theirs = transformers.AutoTokenizer.from_pretrained(HUB_LIKE_TOKENIZER, **kwargs)
    assert ours("Hello there") == dict(theirs("Hello there"))
    assert ours.init_kwargs == {key: theirs.init_kwargs[key] for key in kwargs}
    written = ours.save_pretrained(tmp_path)
    assert Path(written[0]).name == "tokenizer_config.json" and all(Path(f).is_file() for f in written)
    assert {k: json.loads(Path(written[0]).read_text())[k] for k in kwargs} == kwargs
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).init_kwargs["max_length"] == 17
    again = Tokenizer.from_pretrained(tmp_path, max_length=9)
    assert again.init_kwargs == {**kwargs, "max_length": 9}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pad_to_multiple_of": 8}, r"unknown tokenizer option\(s\) \['pad_to_multiple_of'\]"),
    ({"padding": "bogus"}, "padding must be"),
    ({"max_length": 0}, "max_length must be a positive int"),
    ({"truncation": "sideways"}, "Unsupported truncation"),
    ({"model_max_length": -3}, "model_max_length must be a positive int"),
])
def test_tokenizer_options_we_cannot_honour_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER, **kwargs)


# ---------------------------------------------------------------- processor call kwargs
CALL_FORMS: list[dict[str, Any]] = [
    {"padding": "max_length", "max_length": 40},
    {"text_kwargs": {"padding": "max_length", "max_length": 40}},
    {"common_kwargs": {"return_tensors": "np"}, "padding": "longest"},
    {"images_kwargs": {"do_rescale": True, "rescale_factor": -1.0}, "padding": True},
    {"do_normalize": False, "rescale_factor": -0.25, "padding": True},
    {"padding": True, "padding_side": "right"},
    {"text_kwargs": {"add_special_tokens": False}, "padding": True},
    {"truncation": True, "max_length": 60, "padding": True},
]


@pytest.mark.parametrize("options", CALL_FORMS, ids=[str(i) for i in range(len(CALL_FORMS))])
def test_processor_kwargs_forms_give_the_reference_outputs(options: dict[str, Any]) -> None:
    options = {"return_tensors": "pt", **options} if "common_kwargs" not in options else options
    ours = _ours(do_image_splitting=True)(text=TEXTS, images=_images(), **options)
    theirs = _theirs(do_image_splitting=True)(text=TEXTS, images=_images(), **options)
    _same_outputs(ours, theirs)


def test_tokenizer_call_defaults_are_the_processor_text_defaults() -> None:
    """A tokenizer loaded with padding/max_length pads every processor call, unless the call says otherwise."""
    for make, tokenizer in ((_ours, Tokenizer.from_pretrained), (_theirs, transformers.AutoTokenizer.from_pretrained)):
        processor = make()
        processor.tokenizer = tokenizer(HUB_LIKE_TOKENIZER, padding="max_length", max_length=37)
        assert processor(text=TEXTS, images=_images(), return_tensors="pt")["input_ids"].shape == (2, 37)
        shorter = processor(text=TEXTS, images=_images(), return_tensors="pt", max_length=33)
        assert shorter["input_ids"].shape == (2, 33)


def test_processor_from_pretrained_routes_tokenizer_options_like_transformers() -> None:
    kwargs = {"padding_side": "right", "padding": "max_length", "max_length": 30, "do_image_splitting": True}
    ours, theirs = _ours(**kwargs), _theirs(**kwargs)
    assert ours.tokenizer.padding_side == theirs.tokenizer.padding_side == "right"
    assert ours.image_processor.do_image_splitting and theirs.image_processor.do_image_splitting
    _same_outputs(ours(text=TEXTS, images=_images(), return_tensors="pt"),
                  theirs(text=TEXTS, images=_images(), return_tensors="pt"))


@pytest.mark.parametrize("options", [
    {"text_kwargs": {"max_length": 30}, "max_length": 20},
    {"images_kwargs": {"do_rescale": True}, "do_rescale": True},
    {"text_kwargs": {"padding": "do_not_pad"}, "padding": "max_length"},
])
def test_an_option_given_twice_is_refused_like_the_reference(options: dict[str, Any]) -> None:
    for processor in (_ours(), _theirs()):
        with pytest.raises(ValueError, match="passed two times"):
            processor(text=TEXTS, images=_images(), return_tensors="pt", **options)


@pytest.mark.parametrize(("options", "message"), [
    ({"stride": 2}, r"unsupported processor option\(s\) \['stride'\]"),
    ({"text_kwargs": {"bogus": 1}}, r"unsupported text_kwargs option\(s\) \['bogus'\]"),
    ({"images_kwargs": {"bogus": 1}}, r"unsupported images_kwargs option\(s\) \['bogus'\]"),
    ({"common_kwargs": {"padding": True}}, r"unsupported common_kwargs option\(s\) \['padding'\]"),
    ({"audio_kwargs": {"sampling_rate": 16000}}, "takes no audio input"),
    ({"text_kwargs": "padding"}, "text_kwargs must be a dict"),
    ({"text_kwargs": {"return_tensors": "pt"}, "images_kwargs": {"return_tensors": "np"}}, "one output holds both"),
])
def test_options_we_do_not_implement_are_refused_by_name(options: dict[str, Any], message: str) -> None:
    """transformers logs and drops some of these (stride, unknown text keys); silence would hide them."""
    with pytest.raises(ValueError, match=message):
        _ours()(text=TEXTS, images=_images(), **options)


# ---------------------------------------------------------------- processor config files
def test_processor_config_files_match_transformers(tmp_path: Path) -> None:
    ours, theirs = _ours(**CUSTOM), _theirs(**CUSTOM)
    expected = theirs.to_dict()
    got = ours.to_dict()
    assert _without_pixel_limit(got.pop("image_processor")) == _without_pixel_limit(expected.pop("image_processor"))
    assert got == expected
    assert json.loads(ours.to_json_string()) == ours.to_dict()
    written = ours.save_pretrained(tmp_path / "ours")
    assert [Path(f).name for f in written] == [Path(f).name for f in theirs.save_pretrained(tmp_path / "theirs")]
    assert json.loads(Path(written[0]).read_text()) == ours.to_dict()
    reloaded = transformers.Idefics2Processor.from_pretrained(tmp_path / "ours")
    assert reloaded.image_seq_len == SEQ
    assert _without_pixel_limit(reloaded.image_processor.to_dict()) == _without_pixel_limit(
        theirs.image_processor.to_dict())
    assert Idefics2Processor.from_pretrained(tmp_path / "theirs").to_dict() == ours.to_dict()
    ours.to_json_file(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == ours.to_dict()
