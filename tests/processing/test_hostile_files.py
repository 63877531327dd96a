"""Processor folders and calls as untrusted input: every bad file is one ValueError naming the file and
the field, sizes a file or call asks for are bounded, and a save that fails part-way leaves every file
old or new and the folder loadable."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import HUB_LIKE_TOKENIZER
from idefics2 import files
from idefics2.processing.config_files import MAX_IMAGE_SEQ_LEN, MAX_PAD_LENGTH, MIN_IMAGE_SIDE
from idefics2.processing.image_processor import DEFAULT_MAX_IMAGE_PIXELS, Idefics2ImageProcessor
from idefics2.processing.processor import Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
         "preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def _tiny_processor(**tokenizer_settings: Any) -> Idefics2Processor:
    """A processor around a 6-word tokenizer: loading it takes milliseconds (the property tests load
    it hundreds of times)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                          add_bos_token=True, add_eos_token=False, **tokenizer_settings)
    return Idefics2Processor(Idefics2ImageProcessor(), tokenizer, image_seq_len=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    _tiny_processor().save_pretrained(folder)
    return folder


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def _write(folder: Path, name: str, content: Any) -> None:
    data = content if isinstance(content, (str, bytes)) else json.dumps(content)
    (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)


def _edit(folder: Path, name: str, **fields: Any) -> None:
    path = folder / name
    config = json.loads(path.read_text()) if path.is_file() else {}
    _write(folder, name, {**config, **fields})


# ------------------------------------------------------------------------ (5) every file validated
HOSTILE = {
    "tokenizer_json_garbage": ("tokenizer.json", "{not json", r"tokenizer\.json: the tokenizers library"),
    "tokenizer_json_list": ("tokenizer.json", "[1, 2]", r"tokenizer\.json: the tokenizers library"),
    "max_length_inf": ("tokenizer_config.json", '{"model_max_length": 1e999}',
                       r"tokenizer_config\.json: model_max_length must be a finite number"),
    "max_length_nan": ("tokenizer_config.json", '{"model_max_length": NaN}',
                       r"tokenizer_config\.json: model_max_length must be"),
    "named_template_without_name": ("tokenizer_config.json", {"chat_template": [{"template": "x"}]},
                                    r"tokenizer_config\.json: chat_template\[0\] must be an object with"),
    "added_token_without_content": ("tokenizer_config.json", {"added_tokens_decoder": {"6": {"special": True}}},
                                    r"tokenizer_config\.json: added_tokens_decoder\['6'\]\.content"),
    "added_token_bad_id": ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "q"}}},
                           r"tokenizer_config\.json: added_tokens_decoder\['x'\]: the key must be a token id"),
    "tokenizer_config_list": ("tokenizer_config.json", "[]", r"tokenizer_config\.json: holds a JSON array"),
    "padding_side": ("tokenizer_config.json", {"padding_side": "up"}, r"tokenizer_config\.json: padding_side"),
    "bad_call_default": ("tokenizer_config.json", {"padding": [1]}, r"tokenizer_config\.json: padding must be"),
    "deep_json": ("tokenizer_config.json", "[" * 100_000, r"tokenizer_config\.json: not valid JSON"),
    "not_utf8": ("tokenizer_config.json", b"\xff\xfe{}", r"tokenizer_config\.json: not UTF-8"),
    "special_map_token": ("special_tokens_map.json", {"bos_token": 5}, r"special_tokens_map\.json: bos_token"),
    "special_map_list": ("special_tokens_map.json", {"additional_special_tokens": "x"},
                         r"special_tokens_map\.json: additional_special_tokens must be a list"),
    "processor_config_list": ("processor_config.json", "[1]", r"processor_config\.json: holds a JSON array"),
    "processor_template": ("processor_config.json", {"chat_template": 5}, r"processor_config\.json: chat_template"),
    "preprocessor_list": ("preprocessor_config.json", "[1]", r"preprocessor_config\.json: holds a JSON array"),
    "preprocessor_field": ("preprocessor_config.json", {"rescale_factor": "x"},
                           r"preprocessor_config\.json: rescale_factor must be a finite number"),
    "chat_template_json_field": ("chat_template.json", {"chat_template": 5}, r"chat_template\.json: chat_template"),
    "chat_template_json_list": ("chat_template.json", "[]", r"chat_template\.json: holds a JSON array"),
    "chat_template_json_bytes": ("chat_template.json", b"\x80", r"chat_template\.json: not UTF-8"),
    "chat_template_jinja_bytes": ("chat_template.jinja", b"\xc3(", r"chat_template\.jinja: not UTF-8"),
    # (6) sizes a file asks for
    "image_seq_len_bomb": ("processor_config.json", {"image_seq_len": 10**8},
                           rf"processor_config\.json: image_seq_len must be a positive int of at most {MAX_IMAGE_SEQ_LEN}"),
    "pixel_guard_off": ("preprocessor_config.json", {"max_image_pixels": None},
                        r"preprocessor_config\.json: max_image_pixels is null, which would turn off"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_one_value_error_naming_file_and_field(tiny: Path, tmp_path: Path, case: str) -> None:
    name, content, message = HOSTILE[case]
    folder = _copy(tiny, tmp_path / "folder")
    if isinstance(content, dict) and name != "chat_template.json":
        _edit(folder, name, **content)
    else:
        _write(folder, name, content)
    with pytest.raises(ValueError, match=message):
        Idefics2Processor.from_pretrained(folder)


def test_the_hub_like_folder_still_loads_and_the_guard_can_be_turned_off_by_the_caller(tmp_path: Path) -> None:
    assert Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER).image_seq_len == 64
    folder = _copy(HUB_LIKE_TOKENIZER, tmp_path / "folder")
    _edit(folder, "preprocessor_config.json", max_image_pixels=None)
    loaded = Idefics2Processor.from_pretrained(folder, max_image_pixels=None)
    assert loaded.image_processor.max_image_pixels is None


def test_a_disabled_guard_is_not_saved(tmp_path: Path) -> None:
    """A file may not turn the guard off, so a processor without it saves a folder that loads with it."""
    processor = _tiny_processor()
    processor.image_processor.max_image_pixels = None
    processor.save_pretrained(tmp_path)
    assert "max_image_pixels" not in json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "max_image_pixels" not in json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert Idefics2Processor.from_pretrained(tmp_path).image_processor.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


# ------------------------------------------------------------------------ (6) sizes a call asks for
def test_padding_to_a_huge_max_length_is_refused() -> None:
    processor = _tiny_processor()
    with pytest.raises(ValueError, match=rf"pad every row to max_length=100000000 .* {MAX_PAD_LENGTH}"):
        processor(text="a b", padding="max_length", max_length=10**8)
    with pytest.raises(ValueError, match=rf"pad every row to max_length=100000000 .* {MAX_PAD_LENGTH}"):
        processor.tokenizer("a b", padding="max_length", max_length=10**8)
    assert len(processor(text="a b", padding="max_length", max_length=7)["input_ids"][0]) == 7


def test_padding_to_a_huge_model_max_length_is_refused() -> None:
    processor = _tiny_processor(model_max_length=10**9)
    with pytest.raises(ValueError, match=r"pad every row to model_max_length=1000000000"):
        processor(text="a b", padding="max_length")


def test_a_huge_image_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match=rf"image_seq_len must be a positive int of at most {MAX_IMAGE_SEQ_LEN}"):
        _tiny_processor()(text="a <image>", image_seq_len=10**8)
    with pytest.raises(ValueError, match="image_seq_len must be a positive int"):
        Idefics2Processor(Idefics2ImageProcessor(), _tiny_processor().tokenizer, image_seq_len=10**8)
    assert _tiny_processor()(text="<image>", image_seq_len=MAX_IMAGE_SEQ_LEN)["input_ids"].shape[1] > 4096


# ------------------------------------------------------------------------ (7) images below one patch
@pytest.mark.parametrize(("size", "options"), [((5, 5), {"do_resize": False}),
                                              ((13, 40), {"do_resize": False}),
                                              ((24, 60), {"do_resize": False, "do_image_splitting": True}),
                                              ((5, 5), {"do_resize": False, "do_pad": False}),
                                              ((30, 30), {"size": {"height": 5, "width": 30}})])
def test_an_image_smaller_than_a_patch_is_refused(size: tuple[int, int], options: dict[str, Any]) -> None:
    image = Image.fromarray(np.zeros((*size, 3), np.uint8))
    text = "<image>"
    with pytest.raises(ValueError, match=rf"sample 0, \(sub-\)image \d: a \d+x\d+ image is smaller than one "
                                         rf"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} vision patch"):
        _tiny_processor()(images=image, text=text, **options)


def test_an_image_of_one_patch_passes() -> None:
    image = Image.fromarray(np.zeros((14, 14, 3), np.uint8))
    out = _tiny_processor()(images=image, text="<image>", do_resize=False)
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, 14, 14)
    assert Idefics2ImageProcessor()(np.zeros((5, 5, 3), np.uint8), do_resize=False)["pixel_values"].shape[-1] == 5


# ------------------------------------------------------------------------ (9) saves are atomic per file
def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _other_processor() -> Idefics2Processor:
    """Differs from `_tiny_processor` in every file our save writes."""
    processor = _tiny_processor(padding_side="right", model_max_length=77)
    processor.tokenizer.add_special_tokens(["<extra>"])
    processor.image_processor.do_image_splitting = True
    processor.image_seq_len = 3
    return processor


def _count_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    calls: list[Path] = []
    real = files.write_file_atomically
    monkeypatch.setattr(files, "write_file_atomically", lambda path, data: (calls.append(path), real(path, data)))
    _other_processor().save_pretrained(tmp_path / "count")
    monkeypatch.setattr(files, "write_file_atomically", real)
    names = {path.name for path in calls}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
            "preprocessor_config.json"} <= names
    return len(calls)


def test_a_save_that_fails_at_any_file_leaves_old_or_new_files_and_a_loadable_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new = tmp_path / "new"
    _other_processor().save_pretrained(new)
    new_files = _contents(new)
    real = files.write_file_atomically
    for failing in range(_count_writes(tmp_path, monkeypatch)):
        folder = tmp_path / f"fail-{failing}"
        _tiny_processor().save_pretrained(folder)
        old_files = _contents(folder)
        count = iter(range(10**6))

        def flaky(path: Path, data: str | bytes, failing: int = failing, count: Any = count) -> None:
            if next(count) == failing:  # the atomic write fails (its own temporary is removed)
                raise OSError("disk full")
            real(path, data)

        monkeypatch.setattr(files, "write_file_atomically", flaky)
        with pytest.raises(OSError, match="disk full"):
            _other_processor().save_pretrained(folder)
        monkeypatch.setattr(files, "write_file_atomically", real)
        for name, data in _contents(folder).items():
            if name in ("chat_template.jinja",):  # written by chat_template.py, identical in both saves
                continue
            assert data in (old_files.get(name), new_files.get(name)), f"write {failing}: {name} is torn"
        Idefics2Processor.from_pretrained(folder)(text="a b <image>", images=np.zeros((20, 20, 3), np.uint8))


def test_a_write_killed_mid_file_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `write_file_atomically` failing after it wrote part of the data (fsync raising)."""
    _tiny_processor().save_pretrained(tmp_path)
    old_files = _contents(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    for save in (_other_processor().save_pretrained, _other_processor().tokenizer.save_pretrained,
                 _other_processor().image_processor.save_pretrained):
        with pytest.raises(OSError, match="I/O error"):
            save(tmp_path)
    monkeypatch.undo()
    assert {name: data for name, data in _contents(tmp_path).items()} == old_files  # no temporaries left
    Idefics2Processor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------ properties
_hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0, 10**8, 10**30, 2**63, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["left", "right", "max_length", "longest", "<s>", "<image>", "{{ x }}"]),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3),
                       st.fixed_dictionaries({"name": st.text(max_size=3)})), max_size=3),
    st.dictionaries(st.sampled_from(["content", "name", "template", "6", "x", "shortest_edge", "height"]),
                    st.one_of(st.none(), st.integers(-2, 5000), st.text(max_size=3), st.booleans()), max_size=3),
)
_FIELDS = {
    "tokenizer_config.json": ["model_max_length", "bos_token", "pad_token", "additional_special_tokens",
                              "add_bos_token", "padding_side", "truncation_side", "chat_template",
                              "added_tokens_decoder", "padding", "truncation", "max_length",
                              "clean_up_tokenization_spaces"],
    "special_tokens_map.json": ["bos_token", "eos_token", "unk_token", "additional_special_tokens"],
    "processor_config.json": ["image_seq_len", "chat_template", "image_processor"],
    "preprocessor_config.json": ["size", "resample", "rescale_factor", "image_mean", "image_std", "do_resize",
                                 "max_image_pixels", "do_image_splitting"],
    "chat_template.json": ["chat_template"],
}


@st.composite
def _hostile_file(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(_FIELDS)))
    if draw(st.integers(0, 9)) == 0:  # the whole file the wrong shape
        return name, draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=4)))
    return name, draw(st.dictionaries(st.sampled_from(_FIELDS[name]), _hostile_values, min_size=1, max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile=_hostile_file())
def test_any_hostile_config_loads_or_is_a_value_error_naming_its_file(
        tiny: Path, tmp_path_factory: pytest.TempPathFactory, hostile: tuple[str, Any]) -> None:
    name, content = hostile
    folder = _copy(tiny, tmp_path_factory.mktemp("hostile"))
    if isinstance(content, dict) and name != "chat_template.json":
        _edit(folder, name, **content)
    else:
        _write(folder, name, json.dumps(content))
    try:
        processor = Idefics2Processor.from_pretrained(folder)
    except ValueError as err:
        assert name in str(err) or (name == "chat_template.json" and "chat_template" in str(err)), str(err)
        return
    try:  # a config that loads may still refuse a call (max_image_pixels=1): a ValueError, nothing else
        processor(text="a b <image>", images=np.zeros((20, 20, 3), np.uint8), padding="longest")
    except ValueError:
        pass


_CALL_FIELDS = ("image_seq_len", "max_length", "padding", "truncation", "do_resize", "do_image_splitting",
                "image", "vision patch", "max_image_pixels", "size", "pad", "special tokens", "Truncation")


@settings(max_examples=150, deadline=None)
@given(side=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       options=st.dictionaries(
           st.sampled_from(["image_seq_len", "max_length", "padding", "truncation", "do_resize",
                            "do_image_splitting", "do_pad", "max_image_pixels"]),
           st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.sampled_from([10**8, 10**30, 4097]),
                     st.floats(allow_nan=True), st.sampled_from(["max_length", "longest", "x"])),
           max_size=4))
def test_any_hostile_call_gives_outputs_or_a_value_error_naming_the_field(
        side: tuple[int, int], options: dict[str, Any]) -> None:
    processor = _PROCESSOR
    try:
        out = processor(text="a <image> b", images=np.zeros((*side, 3), np.uint8), **options)
    except (ValueError, TypeError) as err:
        assert any(field in str(err) for field in _CALL_FIELDS), str(err)
        return
    assert out["input_ids"].shape[0] == 1 and math.prod(out["input_ids"].shape) <= MAX_PAD_LENGTH


_PROCESSOR = _tiny_processor()

