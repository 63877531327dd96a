"""Tokenizer: the 4.x fast-tokenizer behaviour on the Hub-like files (BOS, left padding, truncation, decode).

The oracle is transformers loading the same tokenizer.json verbatim (`PreTrainedTokenizerFast`), which
is what 4.x `LlamaTokenizerFast` did with the Hub file (docs/numerics.md §6.2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HUB_LIKE_TOKENIZER
from idefics2.processing.tokenizer import Tokenizer

PAD, BOS, EOS, IMG = 0, 1, 2, 32001


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER)


def test_special_tokens_and_sizes(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS, EOS, PAD, 0)
    assert (tok.vocab_size, len(tok)) == (32000, 32003)  # base vocabulary vs with the 3 added tokens
    assert tok.all_special_ids == [0, 1, 2, 32000, 32001, 32002]
    assert tok.convert_tokens_to_ids(["<image>", "▁Hello", "never-a-token"]) == [IMG, 22557, 0]
    assert tok.convert_ids_to_tokens([BOS, 13, 28705]) == ["<s>", "<0x0A>", "▁"]
    assert "<image>" in tok and "never-a-token" not in tok
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens(40000)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_to_id("never-a-token")


def test_every_segment_gets_the_word_prefix(tok: Tokenizer) -> None:
    """Spec §6.2 table, v4 column: the normaliser prefixes `▁` after every special token."""
    assert tok("Hello <image> world")["input_ids"] == [BOS, 22557, 28705, IMG, 28705, 1526]
    assert tok("<end_of_utterance>\nAssistant:")["input_ids"] == [BOS, 32002, 28705, 13, 7226, 11143, 28747]
    assert tok("a", add_special_tokens=False) == {"input_ids": [264], "attention_mask": [1]}


def test_left_padding_truncation_and_tensors(tok: Tokenizer) -> None:
    out = tok(
        ["Hello world how are you", "a"], truncation=True, max_length=3, padding=True, return_tensors="pt"
    )
    assert out["input_ids"].tolist() == [[BOS, 22557, 1526], [PAD, BOS, 264]]  # BOS survives truncation
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]] and out["input_ids"].dtype == torch.int64
    assert tok("a", padding="max_length", max_length=4, return_tensors="np")["input_ids"].tolist() == [
        [PAD, PAD, BOS, 264]
    ]
    assert isinstance(tok(["a"], return_tensors="np")["input_ids"], np.ndarray)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"return_tensors": "pt"}, "pass padding=True"),
        ({"padding": "max_length"}, "needs max_length"),
        ({"truncation": True, "max_length": 0}, "no room for the 1 special tokens"),
        ({"padding": "sideways"}, "Unsupported padding"),
        ({"return_tensors": "tf"}, "return_tensors must be"),
    ],
)
def test_bad_arguments_are_value_errors(tok: Tokenizer, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tok(["a", "a longer one"], **kwargs)


def test_decode(tok: Tokenizer) -> None:
    ids = [BOS, 22557, 28705, IMG, 1526]
    assert tok.decode(ids) == "<s> Hello <image> world"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == "Hello  world"
    assert tok.batch_decode(torch.tensor([ids, ids])) == ["<s> Hello <image> world"] * 2
    assert tok.decode(tok("I 'm done .")["input_ids"], clean_up_tokenization_spaces=True) == "<s> I'm done."
    with pytest.raises(ValueError, match="use batch_decode"):
        tok.decode(torch.tensor([ids]))


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    text = ["Voilà <image> 🐱\n", "x"]
    assert again(text, padding=True) == tok(text, padding=True)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(
        (HUB_LIKE_TOKENIZER / "tokenizer.json").read_text()
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["padding_side"] == "left" and config["add_bos_token"] is True and config["legacy"] is True
    assert config["tokenizer_class"] == "LlamaTokenizer"  # unknown keys are kept


def test_add_eos_flag_rebuilds_the_post_processor(tmp_path: Path) -> None:
    shutil.copytree(HUB_LIKE_TOKENIZER, tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer_config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "add_bos_token": False, "add_eos_token": True})
    )
    assert Tokenizer.from_pretrained(tmp_path / "tok")("a")["input_ids"] == [264, EOS]


def test_inconsistent_added_token_ids_are_refused(tmp_path: Path) -> None:
    shutil.copytree(HUB_LIKE_TOKENIZER, tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"]["32005"] = config["added_tokens_decoder"].pop("32001")
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="declares '<image>' as id 32005"):
        Tokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture(scope="module")
def fast_oracle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """transformers on the same files with the class that uses tokenizer.json as it is."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("fast")
    shutil.copytree(HUB_LIKE_TOKENIZER, folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.AutoTokenizer.from_pretrained(folder)


_texts = st.lists(
    st.lists(
        st.one_of(st.text(max_size=10), st.sampled_from(["<image>", "<end_of_utterance>", "\n", " "])),
        max_size=5,
    ).map("".join),
    min_size=1,
    max_size=3,
)


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=_texts,
    add_special_tokens=st.booleans(),
    padding=st.sampled_from([False, True, "max_length"]),
    max_length=st.integers(1, 12),
    truncation=st.booleans(),
)
def test_matches_transformers_fast_tokenizer(
    tok: Tokenizer,
    fast_oracle: Any,
    texts: list[str],
    add_special_tokens: bool,
    padding: bool | str,
    max_length: int,
    truncation: bool,
) -> None:
    kwargs = {"add_special_tokens": add_special_tokens, "padding": padding, "truncation": truncation}
    kwargs["max_length"] = max_length
    ours = tok(texts, **kwargs)
    assert ours == dict(fast_oracle(texts, **kwargs))
    for skip in (False, True):
        assert tok.batch_decode(ours["input_ids"], skip) == fast_oracle.batch_decode(ours["input_ids"], skip)


@pytest.mark.oracle
def test_saved_files_load_in_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.pad_token_id, theirs.padding_side, len(theirs)) == (
        1,
        0,
        "left",
        32003,
    )
    # 5.x rebuilds a `LlamaTokenizer` pipeline; with `legacy: true` it keeps the v4 prefix here.
    assert theirs("<end_of_utterance>\nAssistant:")["input_ids"] == [
        BOS,
        32002,
        28705,
        13,
        7226,
        11143,
        28747,
    ]


@pytest.mark.oracle
def test_tokenizer_apply_chat_template_like_transformers() -> None:
    """The tokenizer had no apply_chat_template; transformers' defaults: tokenize, a dict, no BOS added."""
    import transformers

    ours = Tokenizer.from_pretrained(HUB_LIKE_TOKENIZER)
    reference = transformers.AutoTokenizer.from_pretrained(HUB_LIKE_TOKENIZER)
    # (text right after a special token follows the 4.x rule, README; this template writes none)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    chats = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Hi"}]]
    for options in ({}, {"tokenize": False}, {"return_dict": False}, {"add_generation_prompt": True}):
        got = ours.apply_chat_template(chats[0], chat_template=template, **options)
        expected = reference.apply_chat_template(chats[0], chat_template=template, **options)
        assert (dict(got) if isinstance(got, dict) else got) == (
            expected if isinstance(expected, (str, list)) else dict(expected)), options
    got = ours.apply_chat_template(chats, chat_template=template, padding=True, return_tensors="pt")
    expected = reference.apply_chat_template(chats, chat_template=template, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got.attention_mask, expected["attention_mask"])
    with pytest.raises(ValueError, match="this tokenizer has no chat template"):
        ours.apply_chat_template(chats[0])
    with pytest.raises(ValueError, match=r"\['documents'\] are not supported"):
        ours.apply_chat_template(chats[0], chat_template=template, documents=[{"text": "x"}])
