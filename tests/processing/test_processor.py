"""Idefics2Processor and Tokenizer: 4.x ids on the Hub-like tokenizer, image matching, errors, round trips.

Expected ids are built independently of the package: the text is split at `<image>` as docs/numerics.md §6.3 says,
each text segment is encoded with the raw `tokenizers` library and the image blocks are written as ids.
The golden list of docs/numerics.md §6.2 (transformers 4.57.1) anchors the whole chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_chat_template import SPEC_MESSAGES, SPEC_RENDERED

from conftest import HUB_LIKE_TOKENIZER
from idefics2.processing.batch import BatchFeature
from idefics2.processing.image_processor import Idefics2ImageProcessor
from idefics2.processing.processor import Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer

PAD, BOS, EOS, FAKE, IMG, EOU = 0, 1, 2, 32000, 32001, 32002
SEQ = 2  # image_seq_len used throughout, as in the transformers processor tests

# docs/numerics.md §6.2: transformers 4.57.1 on the rendered 3-image chat, image_seq_len=2 [verified there].
# fmt: off
GOLDEN_CHAT_IDS = [
    1, 1247, 28747, 1824, 511, 1167, 6203, 1347, 28804, 32000, 32001, 32001, 32000, 32001, 32001, 32000,
    32002, 28705, 13, 7226, 11143, 28747, 6005, 18097, 28723, 32002, 28705, 13, 730, 28747, 32000, 32001,
    32001, 32000, 1015, 456, 624, 28804, 32002, 28705, 13, 7226, 11143, 28747,
]
# fmt: on
CHAT = SPEC_MESSAGES  # the multi-turn, multi-image chat of docs/numerics.md §6.6
CHAT_TEXT = SPEC_RENDERED + "Assistant:"


@pytest.fixture(scope="module")
def raw() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(HUB_LIKE_TOKENIZER / "tokenizer.json"))


@pytest.fixture(scope="module")
def processor() -> Idefics2Processor:
    """Shared and never mutated: tests that need other settings build their own around its tokenizer."""
    ours = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    return Idefics2Processor(
        ours.image_processor, ours.tokenizer, image_seq_len=SEQ, chat_template=ours.chat_template
    )


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(30, 40), (60, 20), (25, 25)]
    ]


def expected_ids(
    raw: tokenizers.Tokenizer, text: str, *, seq: int = SEQ, split: bool = False, bos: bool = True
) -> list[int]:
    """Spec §6.3 by hand: text segments through raw tokenizers, image blocks as ids, adjacent fakes shared."""
    ids = [BOS] if bos else []
    unit = ([IMG] * seq + [FAKE]) * (5 if split else 1)
    segments = text.split("<image>")
    for index, segment in enumerate(segments):
        if segment:
            ids += raw.encode(segment, add_special_tokens=False).ids
        if index < len(segments) - 1:
            follows_image = index > 0 and segment == ""
            ids += unit if follows_image else [FAKE, *unit]
    return ids


def left_pad(rows: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    width = max(map(len, rows))
    return (
        [[PAD] * (width - len(r)) + r for r in rows],
        [[0] * (width - len(r)) + [1] * len(r) for r in rows],
    )


# ---------------------------------------- token ids
def test_golden_chat_ids_of_transformers_4x(processor: Idefics2Processor) -> None:
    assert processor.apply_chat_template(CHAT, add_generation_prompt=True) == CHAT_TEXT
    assert processor(text=CHAT_TEXT)["input_ids"][0].tolist() == GOLDEN_CHAT_IDS
    assert processor.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True) == [GOLDEN_CHAT_IDS]


def test_image_only_gives_pixels_and_no_text(processor: Idefics2Processor, images: list[Image.Image]) -> None:
    out = processor(images=images[0])
    assert isinstance(out, BatchFeature) and set(out) == {"pixel_values", "pixel_attention_mask"}
    assert out.pixel_values.shape[:3] == (1, 1, 3)


def test_single_image_prompt_matches_spec_9_3(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, images: list[Image.Image]
) -> None:
    out = processor(images=images[0], text="<image>In this image, we see")
    text_ids = raw.encode("In this image, we see", add_special_tokens=False).ids
    assert out.input_ids.tolist() == [[BOS, FAKE, IMG, IMG, FAKE, *text_ids]]
    assert out.attention_mask.tolist() == [[1] * (5 + len(text_ids))]
    assert out.pixel_values.shape[:3] == (1, 1, 3) and out.pixel_attention_mask.dtype == torch.int64


def test_batch_is_left_padded_with_shared_fakes(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, images: list[Image.Image]
) -> None:
    text = ["<image>In this image, we see", "bla, bla<image><image>"]
    out = processor(images=[[images[0]], images[1:]], text=text, padding=True, return_tensors="pt")
    rows = [expected_ids(raw, t) for t in text]
    assert rows[1][-7:] == [FAKE, IMG, IMG, FAKE, IMG, IMG, FAKE]
    ids, mask = left_pad(rows)
    assert out.input_ids.tolist() == ids and out.attention_mask.tolist() == mask
    assert out.input_ids[0, 0] == PAD and out.pixel_values.shape[:3] == (2, 2, 3)
    assert out.pixel_attention_mask[0, 1].sum() == 0  # sample 0 has one image: its second slot is padding


@pytest.mark.parametrize(
    "text",
    [
        "<image><image><image>",
        "Hello <image> world",
        " leading space<image>\ntrailing newline\n",
        "Voilà, 日本語の猫 🐱<image>ça va?<end_of_utterance>\nAssistant:",
        "a<image>b<image> c <image><image>d",
    ],
)
def test_text_around_images_follows_the_4x_rule(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, text: str
) -> None:
    assert processor(text=text)["input_ids"][0].tolist() == expected_ids(raw, text)


def test_text_right_after_an_image_gets_no_inserted_space(processor: Idefics2Processor) -> None:
    """4.x: `<fake>In` -> 32000, 560 (▁In) through the normaliser; 5.x would first insert a space."""
    assert processor(text="<image>In this")["input_ids"][0].tolist() == [BOS, FAKE, IMG, IMG, FAKE, 560, 456]


def test_add_special_tokens_false_drops_bos(processor: Idefics2Processor, raw: tokenizers.Tokenizer) -> None:
    text = "<image>In this image"
    assert processor(text=text, add_special_tokens=False)["input_ids"][0].tolist() == expected_ids(
        raw, text, bos=False
    )
    assert processor(text=text)["input_ids"][0, 0] == BOS


def test_image_seq_len_per_call(processor: Idefics2Processor, raw: tokenizers.Tokenizer) -> None:
    out = processor(text="x<image><image>y", image_seq_len=3)
    assert out.input_ids[0].tolist() == expected_ids(raw, "x<image><image>y", seq=3)


def test_splitting_attribute_drives_text_and_pixels(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, images: list[Image.Image]
) -> None:
    splitting = Idefics2Processor(
        Idefics2ImageProcessor(do_image_splitting=True), processor.tokenizer, image_seq_len=SEQ
    )
    out = splitting(images=[images[0], images[1]], text="<image>x<image>")
    assert out.input_ids[0].tolist() == expected_ids(raw, "<image>x<image>", split=True)
    assert (out.input_ids == IMG).sum() == 2 * 5 * SEQ and out.pixel_values.shape[:2] == (1, 10)
    unsplit = splitting(images=images[0], text="<image>", do_image_splitting=False)
    assert (
        unsplit.input_ids[0].tolist() == expected_ids(raw, "<image>") and unsplit.pixel_values.shape[1] == 1
    )


def test_per_call_splitting_drives_text_and_pixels(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, images: list[Image.Image]
) -> None:
    """Spec §6.3 pitfall: 5.24 splits the pixels but expands the text once. Here both follow the flag."""
    out = processor(images=images[0], text="<image>In this", do_image_splitting=True)
    assert out.input_ids[0].tolist() == expected_ids(raw, "<image>In this", split=True)
    assert (out.input_ids == IMG).sum() == 5 * SEQ and out.pixel_values.shape[:2] == (1, 5)
    assert processor.image_processor.do_image_splitting is False  # the call did not leak into the attribute


def test_flat_image_list_is_split_by_prompt(processor: Idefics2Processor, images: list[Image.Image]) -> None:
    text = ["<image>In this image, we see", "bla, bla<image><image>"]
    flat = processor(images=images, text=text, padding=True)
    nested = processor(images=[[images[0]], images[1:]], text=text, padding=True)
    assert flat.pixel_values.shape[:2] == (2, 2)
    for key in nested:
        torch.testing.assert_close(flat[key], nested[key], rtol=0, atol=0)


def test_sample_without_images(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, images: list[Image.Image]
) -> None:
    out = processor(images=[[images[0]], []], text=["<image>a", "no image here"])
    assert (
        out.input_ids.tolist()
        == left_pad([expected_ids(raw, "<image>a"), expected_ids(raw, "no image here")])[0]
    )
    assert out.pixel_values.shape[:2] == (2, 1) and out.pixel_attention_mask[1].sum() == 0
    text_only = processor(images=[[], []], text=["a", "b"])
    assert "pixel_values" not in text_only and text_only.input_ids.shape == (2, 2)


def test_image_tokens_without_images_are_kept(processor: Idefics2Processor) -> None:
    """Spec §6.4 item 6: not an error in the reference; the ids are expanded, no pixels returned."""
    out = processor(text="<image>hi")
    assert (out.input_ids == IMG).sum() == SEQ and "pixel_values" not in out


# ---------------------------------------- tensors, padding, truncation
def test_default_output_is_torch_and_ragged_batches_are_left_padded(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer
) -> None:
    out = processor(text=["a", "a longer prompt"])
    assert isinstance(out.input_ids, torch.Tensor) and out.input_ids.dtype == torch.int64
    ids, mask = left_pad([expected_ids(raw, "a"), expected_ids(raw, "a longer prompt")])
    assert out.input_ids.tolist() == ids and out.attention_mask.tolist() == mask


def test_explicit_tensors_need_padding_for_ragged_text(processor: Idefics2Processor) -> None:
    with pytest.raises(ValueError, match="pass padding=True"):
        processor(text=["a", "a longer prompt"], return_tensors="pt")
    out = processor(text=["a", "a longer prompt"], return_tensors="np", padding="longest")
    assert isinstance(out.input_ids, np.ndarray) and out.input_ids.shape == (2, 4)
    padded = processor(text="a", padding="max_length", max_length=6, return_tensors="pt")
    assert padded.attention_mask.tolist() == [[0, 0, 0, 0, 1, 1]]


def test_truncation_that_keeps_images_whole_is_allowed(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer
) -> None:
    text = "<image>In this image, we see a cat"
    out = processor(text=text, truncation=True, max_length=8)
    assert out.input_ids[0].tolist() == expected_ids(raw, text)[:8]


@pytest.mark.parametrize("max_length", [2, 3, 4])
def test_truncation_through_an_image_is_refused(processor: Idefics2Processor, max_length: int) -> None:
    with pytest.raises(ValueError, match="Truncation would cut through the image tokens of sample 1"):
        processor(text=["a", "<image>b"], truncation=True, max_length=max_length, padding=True)


# ---------------------------------------- errors (docs/numerics.md §6.4)
ERROR_CASES = [
    ("no_input", None, None, "You must provide either `text` or `images`."),
    ("text_not_str", "img", 3, "Invalid input text"),
    ("text_list_of_non_str", "img", ["<image>", 4], "Invalid input text"),
    ("empty_text_list", None, [], "Invalid input text"),
    ("images_but_no_image_token", "img", "no token here", "the text contains no <image> token"),
    ("flat_images_but_no_image_token", ["img"], "no token here", r"Found 0 <image> tokens and 1 images"),
    ("nested_images_but_no_image_token", [["img"]], "no token here", "the text contains no <image> token"),
    ("flat_count_mismatch", ["img", "img"], "<image>", r"Found 1 <image> tokens and 2 images"),
    ("batched_flat_count_mismatch", ["img"], ["<image>", "<image>"], r"Found 2 <image> tokens and 1 images"),
    (
        "nested_count_mismatch",
        [["img"], []],
        ["<image>", "<image>"],
        r"images in the text \[1, 1\] and images \[1, 0\]",
    ),
    (
        "nested_batch_size_mismatch",
        [["img"]],
        ["<image>", "x"],
        r"images in the text \[1, 0\] and images \[1\]",
    ),
    ("too_few_nested", [["img"]], "<image><image>", r"images in the text \[2\] and images \[1\]"),
    ("url_string", "http://x/y.png", "<image>", "Invalid input images"),
    ("mixed_nesting", ["img", ["img"]], "<image><image>", "Invalid input images"),
    ("too_deep", [[["img"]]], "<image>", "Invalid input images"),
    ("empty_images", [], "<image>", "Invalid input images"),
    ("bad_seq_len", None, "<image>", "image_seq_len must be a positive int"),
    ("bad_split_flag", None, "<image>", "do_image_splitting must be a bool"),
    ("bad_return_tensors", None, "x", "return_tensors must be"),
    ("unknown_kwarg", "img", "<image>", r"unknown or unsupported processor option\(s\) \['do_magic'\]"),
]


def _materialise(value: Any, image: Image.Image) -> Any:
    if value == "img":
        return image
    if isinstance(value, list):
        return [_materialise(v, image) for v in value]
    return value


@pytest.mark.parametrize(
    ("name", "images_spec", "text", "message"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_every_mismatch_is_a_value_error(
    processor: Idefics2Processor,
    images: list[Image.Image],
    name: str,
    images_spec: Any,
    text: Any,
    message: str,
) -> None:
    kwargs: dict[str, Any] = {
        "bad_seq_len": {"image_seq_len": 0},
        "bad_split_flag": {"do_image_splitting": 1},
        "bad_return_tensors": {"return_tensors": "tf"},
        "unknown_kwarg": {"do_magic": True},
    }.get(name, {})
    with pytest.raises(ValueError, match=message):
        processor(images=_materialise(images_spec, images[0]), text=text, **kwargs)


# ---------------------------------------- property tests
class _RecordingImageProcessor:
    """Stands in for the image processor so the properties test matching, not pixels (and run fast)."""

    do_image_splitting = False

    def to_dict(self) -> dict[str, Any]:
        return {"do_image_splitting": self.do_image_splitting}

    def __call__(self, images: list[list[Any]], **_: Any) -> BatchFeature:
        return BatchFeature(n_images=[len(sample) for sample in images])


_text_chunk = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    samples=st.lists(
        st.lists(st.one_of(_text_chunk, st.just("<image>")), max_size=8), min_size=1, max_size=3
    ),
    seq=st.integers(1, 4),
    split=st.booleans(),
)
def test_expansion_property(
    processor: Idefics2Processor, raw: tokenizers.Tokenizer, samples: list[list[str]], seq: int, split: bool
) -> None:
    """k images -> k·seq·(5 if split) image ids; one fake per block plus one per run of adjacent images."""
    texts = ["".join(parts) for parts in samples]
    out = processor(text=texts, image_seq_len=seq, do_image_splitting=split, padding=True)
    for text, ids, mask in zip(texts, out.input_ids.tolist(), out.attention_mask.tolist(), strict=True):
        ids = ids[len(mask) - sum(mask) :]
        k = text.count("<image>")
        runs = len([part for part in text.split("<image>")[1:] if part]) + (
            1 if text.endswith("<image>") else 0
        )
        blocks = k * (5 if split else 1)
        assert ids.count(IMG) == blocks * seq
        assert ids.count(FAKE) == (blocks + runs if k else 0)
        assert ids == expected_ids(raw, text, seq=seq, split=split)


_leaf = st.sampled_from(["img", "img", "str", None, 3, "array4d"])
_structure = st.recursive(_leaf, lambda children: st.lists(children, max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    structure=_structure,
    n_tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3),
    with_text=st.booleans(),
)
def test_bad_nesting_raises_only_value_error(
    processor: Idefics2Processor,
    images: list[Image.Image],
    structure: Any,
    n_tokens: list[int],
    with_text: bool,
) -> None:
    leaves = {"img": images[0], "str": "not an image", "array4d": np.zeros((2, 8, 8, 3), np.uint8)}

    def build(node: Any) -> Any:
        return [build(n) for n in node] if isinstance(node, list) else leaves.get(node, node)  # type: ignore[arg-type]

    recording = Idefics2Processor(_RecordingImageProcessor(), processor.tokenizer, image_seq_len=1)  # type: ignore[arg-type]
    text = ["<image>" * n for n in n_tokens] if with_text else None
    try:
        out = recording(images=build(structure), text=text)
    except ValueError:
        return
    if structure is not None and text is not None and sum(n_tokens):
        assert out["n_images"] == n_tokens  # matched exactly, sample by sample


# ---------------------------------------- other tokenizers, save/load
def test_special_token_ids(processor: Idefics2Processor) -> None:
    ids = (processor.fake_image_token_id, processor.image_token_id, processor.end_of_utterance_id)
    assert ids == (FAKE, IMG, EOU)


def test_decode_goes_through_the_tokenizer(processor: Idefics2Processor) -> None:
    ids = processor(text=["Hi<image>there<end_of_utterance>", "a"])["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Hi there", "a"]
    assert processor.decode(ids[0]).startswith("<s> Hi<fake_token_around_image><image>")


def test_processor_works_with_a_tokenizer_without_idefics2_tokens(
    tmp_path: Path, images: list[Image.Image]
) -> None:
    """A byte-level BPE trained here: the processor adds the three tokens, BOS comes from the config flags."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["a cat on a mat", "two cats", "what is this?"] * 5, trainer)
    tok = Tokenizer(
        backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=True,
    )
    ours = Idefics2Processor(Idefics2ImageProcessor(), tok, image_seq_len=3)
    base = backend.get_vocab_size()
    assert (ours.fake_image_token_id, ours.image_token_id, ours.end_of_utterance_id) == (
        base - 3,
        base - 2,
        base - 1,
    )
    out = ours(images=images[0], text="a cat<image>on a mat")
    cat, mat = (backend.encode(s, add_special_tokens=False).ids for s in ("a cat", "on a mat"))
    fake, img = ours.fake_image_token_id, ours.image_token_id
    assert out.input_ids[0].tolist() == [1, *cat, fake, img, img, img, fake, *mat, 2]
    assert ours.decode(out.input_ids[0], skip_special_tokens=True) == "a caton a mat"
    ours.save_pretrained(tmp_path)
    again = Idefics2Processor.from_pretrained(tmp_path)
    assert (
        again.image_seq_len == 3
        and again(text="a cat<image>on a mat").input_ids.tolist() == out.input_ids.tolist()
    )


def test_processor_save_load_round_trip(processor: Idefics2Processor, tmp_path: Path) -> None:
    processor.save_pretrained(tmp_path)
    again = Idefics2Processor.from_pretrained(tmp_path)
    assert again.image_seq_len == SEQ and again.chat_template == processor.chat_template
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again(text=CHAT_TEXT).input_ids[0].tolist() == GOLDEN_CHAT_IDS


# ---------------------------------------- oracle (transformers 5.24)
@pytest.fixture(scope="module")
def oracle() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)


@pytest.mark.oracle
def test_what_we_save_loads_in_transformers(
    processor: Idefics2Processor, images: list[Image.Image], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    processor.save_pretrained(tmp_path)
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "Idefics2Processor" and theirs.image_seq_len == SEQ
    assert theirs.image_processor.do_image_splitting is False
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True) == CHAT_TEXT
    # `legacy: true` makes 5.24 keep the 4.x prefix rule, so the chat encodes to the same ids.
    assert theirs(text=CHAT_TEXT)["input_ids"] == [GOLDEN_CHAT_IDS]
    # Full parity where 5.24's extra space rule does not fire (no text glued to a closing fake).
    text = ["User:<image>\nWhat is it?<end_of_utterance>\nAssistant:", "<image><image>"]
    ours = processor(images=images, text=text, padding=True)
    ref = theirs(images=images, text=text, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        torch.testing.assert_close(ours[key], ref[key].to(ours[key].dtype), rtol=0, atol=0)


@pytest.mark.oracle
def test_what_transformers_saves_loads_in_ours(oracle: Any, tmp_path: Path) -> None:
    oracle.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file() and not (
        tmp_path / "preprocessor_config.json"
    ).exists()
    ours = Idefics2Processor.from_pretrained(tmp_path)
    assert ours.image_seq_len == oracle.image_seq_len == 64
    assert ours.image_processor.to_dict()["size"] == oracle.image_processor.size
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == CHAT_TEXT
    # The 5.x tokenizer.json it wrote segments the 5.x way; ours follows the file exactly.
    for text in ["Hello <image> world", "<end_of_utterance>\nAssistant:", " hi", "Voilà 🐱"]:
        assert ours.tokenizer(text) == dict(oracle.tokenizer(text))
    text = "User:<image> What?<end_of_utterance>\nAssistant:"  # no space insertion by the 5.x processor here
    assert ours(text=text).input_ids.tolist() == oracle(text=text)["input_ids"]


# ---------------------------------------------------------------- apply_chat_template, the one-call form
def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _carrying(image: Image.Image, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_one_call_chat_template_gives_the_model_inputs_like_transformers() -> None:
    """`apply_chat_template(..., tokenize=True, return_dict=True, return_tensors="pt")` returned a plain
    list before (the options were handed to the template). Now: the processor's own two-step result,
    with the reference's keys and its pixels (the ids follow the 4.x rule, see README)."""
    import transformers

    ours = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    reference = transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    images = [_photo(0, (40, 50)), _photo(1, (70, 30))]
    chats = [_carrying(images[0], "What is it?"), _carrying(images[1], "And this one, in a few words?")]
    got = ours.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    two_step = ours(images=[[images[0]], [images[1]]], return_tensors="pt", padding=True,
                    text=ours.apply_chat_template(chats, add_generation_prompt=True))
    expected = reference.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt", processor_kwargs={"padding": True})
    assert isinstance(got, BatchFeature) and set(got) == set(expected) == set(two_step)
    for key in got:
        assert torch.equal(got[key], two_step[key]), key
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    mask = got["pixel_attention_mask"]
    assert torch.equal(mask, expected["pixel_attention_mask"].to(mask.dtype))
    ids = ours.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=True, return_tensors="pt")
    assert torch.equal(ids, ours(text=ours.apply_chat_template(chats[0], add_generation_prompt=True))["input_ids"])


def test_chat_template_image_parts_from_files_and_refusals(tmp_path: Path) -> None:
    ours = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    _photo(2, (30, 40)).save(tmp_path / "photo.png")
    by_path = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "photo.png")},
                                            {"type": "text", "text": "Hi"}]}]
    inputs = ours.apply_chat_template(by_path, tokenize=True, return_dict=True)
    assert inputs["pixel_values"].shape[:2] == (1, 1)
    cases = [
        ({"tokenize": False, "return_dict": True}, "return_dict=True needs tokenize=True"),
        ({"tokenize": True, "tools": [{"name": "x"}]}, r"option\(s\) \['tools'\] are not supported"),
        ({"tokenize": True, "continue_final_message": True}, "continue_final_message"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.apply_chat_template(by_path, **options)
    remote = [{"role": "user", "content": [{"type": "image", "url": "http://example.com/a.png"}]}]
    with pytest.raises(ValueError, match="remote images are not fetched"):
        ours.apply_chat_template(remote, tokenize=True, return_dict=True)
    mixed = [{"role": "user", "content": [*by_path[0]["content"], {"type": "image"}]}]
    with pytest.raises(ValueError, match="1 image parts carry an image and 1 do not"):
        ours.apply_chat_template(mixed, tokenize=True, return_dict=True)
    missing = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "none.png")}]}]
    with pytest.raises(ValueError, match="conversation 0, message 0, part 0: cannot read image"):
        ours.apply_chat_template(missing, tokenize=True, return_dict=True)


def test_processor_token_attributes_match_transformers() -> None:
    import transformers

    ours = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    reference = transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    for name in ("image_token", "fake_image_token", "end_of_utterance_token"):
        assert getattr(ours, name) == str(getattr(reference, name)), name  # the reference's may be an AddedToken
    assert ours.image_token_id == reference.image_token_id
    assert ours.model_input_names == reference.model_input_names


def test_from_pretrained_overrides_like_transformers() -> None:
    """`from_pretrained(folder, do_image_splitting=True, image_seq_len=...)` was refused before."""
    import transformers

    ours = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER, do_image_splitting=True, image_seq_len=3)
    reference = transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER, do_image_splitting=True,
                                                               image_seq_len=3)
    assert ours.image_processor.do_image_splitting and reference.image_processor.do_image_splitting
    assert ours.image_seq_len == reference.image_seq_len == 3
    image = _photo(3, (60, 40))
    got = ours(images=[image], text="<image>Hi", return_tensors="pt")
    expected = reference(images=[image], text="<image>Hi", return_tensors="pt")
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert got["pixel_values"].shape[1] == 5  # 4 crops + the whole image
    with pytest.raises(ValueError, match=r"unknown image processor or tokenizer option\(s\) \['do_image_spliting'\]"):
        Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER, do_image_spliting=True)


def test_tokenizer_outputs_read_as_attributes_like_transformers() -> None:
    import transformers

    ours = Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER)
    reference = transformers.AutoTokenizer.from_pretrained(HUB_LIKE_TOKENIZER)
    assert ours("Hello there").input_ids == reference("Hello there").input_ids
    batch = ours(["a b", "Hello there"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, len(ours("Hello there")["input_ids"]))
