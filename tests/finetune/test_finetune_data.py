"""`finetune --data` from a saved `datasets` data set, a Parquet file and a JSON array, in the `messages`,
question/answer and `texts` shapes: the same batches as the JSON Lines file with image paths; bad rows
named; and the processor overrides (`--image-splitting`, `--longest-edge`) against transformers."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_finetune import _history, checkpoint  # noqa: F401 - fixtures

from conftest import SHIPPED
from idefics2.finetune.command import FinetuneConfig, finetune
from idefics2.finetune.data import (
    StoredImage,
    assistant_prefix_ids,
    load_conversations,
    load_processor,
    make_batch,
)
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa.presets import build_processor
from recipes.shapes_vqa.synthetic import render, sample_scene

datasets = pytest.importorskip("datasets")

QUESTIONS = ("How many shapes are there?", "What colour is the big one?", "Is there a circle?")
ANSWERS = ("Three.", "Red, and a little blue.", "No.")


@pytest.fixture(scope="module")
def processor() -> Any:
    return build_processor("tiny", Tokenizer.from_pretrained(SHIPPED))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """Image files of three records: two images, one, none (and a folder to write the data into)."""
    folder = tmp_path_factory.mktemp("scenes")
    rng = random.Random(5)
    names = []
    for i, n in enumerate((2, 1, 0)):
        names.append([])
        for j in range(n):
            # uneven sizes, so resizing and padding differ between the images
            render(sample_scene(rng)).resize((40 + 8 * i, 32 + 4 * j)).save(folder / f"{i}-{j}.png")
            names[-1].append(f"{i}-{j}.png")
    return folder, names


def _messages(n_images: int, question: str, answer: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [*[{"type": "image"}] * n_images, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _batch(path: Path, processor: Any) -> dict[str, torch.Tensor]:
    return make_batch(
        load_conversations(path), processor, assistant_prefix_ids(processor.tokenizer), str(path)
    )


def _assert_same_batches(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def _image_features(names: list[list[str]], folder: Path) -> dict[str, list[Any]]:
    """The images as `datasets` holds them once encoded: PIL images in, PNG bytes stored."""
    return {"images": [[Image.open(folder / name) for name in row] for row in names]}


def test_a_saved_dataset_a_parquet_file_and_a_json_array_give_the_jsonl_batches(
    scenes: tuple[Path, list[list[str]]], processor: Any
) -> None:
    folder, names = scenes
    records = [
        {"messages": _messages(len(row), q, a), "images": row}
        for row, q, a in zip(names, QUESTIONS, ANSWERS, strict=True)
    ]
    expected = _batch(_write_jsonl(folder / "train.jsonl", records), processor)
    assert expected["pixel_values"].shape[:2] == (3, 2)
    features = datasets.Features(
        {
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {"messages": [r["messages"] for r in records], **_image_features(names, folder)}, features=features
    )
    dataset.save_to_disk(str(folder / "saved"))
    dataset.to_parquet(str(folder / "train.parquet"))
    (folder / "train.json").write_text(json.dumps(records), encoding="utf-8")
    for path in (folder / "saved", folder / "train.parquet", folder / "train.json"):
        _assert_same_batches(_batch(path, processor), expected)
    # a table's rows carry {"type": "image", "text": None}: the messages are the JSON Lines ones exactly
    assert [c.messages for c in load_conversations(folder / "saved")] == [
        c.messages for c in load_conversations(folder / "train.jsonl")
    ]
    stored = load_conversations(folder / "saved")[0].images
    assert all(isinstance(image, StoredImage) for image in stored)  # kept encoded in the table until used
    assert stored[1].data() == (folder / "0-1.png").read_bytes()
    assert all(isinstance(image, Path) for image in load_conversations(folder / "train.json")[0].images)


def test_question_answer_and_texts_columns_are_the_same_conversations(
    scenes: tuple[Path, list[list[str]]], processor: Any
) -> None:
    """One `image` column with `question`/`answer` (the tutorial's shape), and the Cauldron's `texts` turns
    with an `images` list: the images open the first user turn."""
    folder, names = scenes
    single = [row[:1] for row in names]
    expected = _batch(
        _write_jsonl(
            folder / "qa.jsonl",
            [
                {"messages": _messages(len(row), q, a), "images": row}
                for row, q, a in zip(single, QUESTIONS, ANSWERS)
            ],
        ),
        processor,
    )
    dataset = datasets.Dataset.from_dict(
        {
            "image": [Image.open(folder / row[0]) if row else None for row in single],
            "question": list(QUESTIONS),
            "answer": list(ANSWERS),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        ),
    )
    dataset.save_to_disk(str(folder / "qa"))
    _assert_same_batches(_batch(folder / "qa", processor), expected)
    # also as JSON lines, with the tutorial's column names and paths
    _assert_same_batches(
        _batch(
            _write_jsonl(
                folder / "qa2.jsonl",
                [
                    {"question": q, "answer": a, **({"image": row[0]} if row else {})}
                    for row, q, a in zip(single, QUESTIONS, ANSWERS)
                ],
            ),
            processor,
        ),
        expected,
    )

    two_turns = [
        {"messages": [*_messages(len(row), q, a), *_messages(0, "And then?", "Nothing more.")], "images": row}
        for row, q, a in zip(names, QUESTIONS, ANSWERS)
    ]
    expected = _batch(_write_jsonl(folder / "turns.jsonl", two_turns), processor)
    cauldron = datasets.Dataset.from_dict(
        {
            "texts": [
                [
                    {"user": q, "assistant": a, "source": "test"},
                    {"user": "And then?", "assistant": "Nothing more.", "source": "test"},
                ]
                for q, a in zip(QUESTIONS, ANSWERS)
            ],
            **_image_features(names, folder),
        },
        features=datasets.Features(
            {
                "texts": [
                    {
                        "user": datasets.Value("string"),
                        "assistant": datasets.Value("string"),
                        "source": datasets.Value("string"),
                    }
                ],
                "images": datasets.Sequence(datasets.Image()),
            }
        ),
    )
    cauldron.to_parquet(str(folder / "cauldron.parquet"))
    _assert_same_batches(_batch(folder / "cauldron.parquet", processor), expected)


def _qa_dataset(images: list[Any]) -> Any:
    return datasets.Dataset.from_dict(
        {"image": images, "question": ["Q?"] * len(images), "answer": ["A."] * len(images)}
    )


def test_bad_rows_and_folders_are_named(
    scenes: tuple[Path, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, names = scenes
    good = (folder / names[0][0]).read_bytes()
    _qa_dataset([{"bytes": good, "path": None}, {"bytes": b"not an image", "path": None}]).save_to_disk(
        str(tmp_path / "broken")
    )
    with pytest.raises(ValueError, match=r"broken row 1: cannot read image image: cannot identify"):
        load_conversations(tmp_path / "broken")
    # a damaged file whose header reads is found when its batch is made, and named by its row
    _qa_dataset([{"bytes": good, "path": None}, {"bytes": good[:200], "path": None}]).to_parquet(
        str(tmp_path / "cut.parquet")
    )
    conversations = load_conversations(tmp_path / "cut.parquet")
    with pytest.raises(ValueError, match=r"cut.parquet row 1: cannot read an image"):
        make_batch(
            conversations, build_processor("tiny", Tokenizer.from_pretrained(SHIPPED)), [1], "cut.parquet"
        )
    # more pixels than allowed, from the header, before anything is decoded (files and bytes alike)
    Image.new("1", (9500, 9500)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big.png is 9500x9500 = 90250000 pixels, more than the 89478485"):
        load_conversations(
            _write_jsonl(tmp_path / "big.jsonl", [{"question": "Q?", "answer": "A.", "image": "big.png"}])
        )
    _qa_dataset([{"bytes": (tmp_path / "big.png").read_bytes(), "path": None}]).save_to_disk(
        str(tmp_path / "bigs")
    )
    with pytest.raises(ValueError, match=r"bigs row 0: image image is 9500x9500"):
        load_conversations(tmp_path / "bigs")

    splits = datasets.DatasetDict({"train": _qa_dataset([None]), "test": _qa_dataset([None])})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\] of a DatasetDict; pass one"):
        load_conversations(tmp_path / "splits")
    assert len(load_conversations(tmp_path / "splits" / "test")) == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(
        ValueError, match="plain is a folder but not a data set written by datasets' save_to_disk"
    ):
        load_conversations(tmp_path / "plain")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: cannot read it as Parquet"):
        load_conversations(tmp_path / "bad.parquet")
    datasets.Dataset.from_dict({"prompt": ["Q?"], "completion": ["A."]}).to_parquet(
        str(tmp_path / "other.parquet")
    )
    with pytest.raises(
        ValueError,
        match=r'other.parquet row 0: expected "messages", "question" and "answer", or '
        r"\"texts\"; the record has \['completion', 'prompt'\]",
    ):
        load_conversations(tmp_path / "other.parquet")
    for records, message in (
        ([{"question": "Q?", "answer": 3}], 'row 0: "question" and "answer" must both be strings'),
        (
            [{"question": "Q?", "answer": "A.", "images": [7]}],
            r"row 0: images\[0\] must be an image file path or",
        ),
        ([{"texts": [{"user": "Q?"}]}], 'row 0: "texts" must be a non-empty list of'),
        ([{"question": "Q?", "answer": "A."}, "Q?"], "row 1: expected an object"),
        ('[{"question": "Q?",', r"d.json: not valid JSON \(Expecting"),
    ):
        (tmp_path / "d.json").write_text(
            records if isinstance(records, str) else json.dumps(records), encoding="utf-8"
        )
        with pytest.raises(ValueError, match=message):
            load_conversations(tmp_path / "d.json")

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r'needs the datasets extra: pip install "idefics2\[datasets\]"'):
        load_conversations(tmp_path / "splits" / "test")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"other.parquet \(a Parquet file\) needs the datasets extra"):
        load_conversations(tmp_path / "other.parquet")


def test_an_image_path_in_a_table_is_relative_to_the_data(
    scenes: tuple[Path, list[list[str]]], processor: Any
) -> None:
    """datasets' Image feature made from file names keeps the path and no bytes."""
    folder, names = scenes
    (folder / "paths.json").write_text(
        json.dumps([{"question": "Q?", "answer": "A.", "image": {"bytes": None, "path": names[1][0]}}])
    )
    expected = _write_jsonl(
        folder / "paths.jsonl", [{"question": "Q?", "answer": "A.", "image": names[1][0]}]
    )
    _assert_same_batches(_batch(folder / "paths.json", processor), _batch(expected, processor))


@pytest.mark.oracle
def test_image_overrides_reach_the_processor_as_transformers_takes_them(checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    image = render(sample_scene(random.Random(2))).resize((96, 40))
    base = load_processor(checkpoint)
    assert base.image_processor.size == {"shortest_edge": 32, "longest_edge": 32}
    assert base.image_processor.do_image_splitting is False
    for splitting, longest, size in (
        (True, 64, {"shortest_edge": 32, "longest_edge": 64}),
        (None, 16, {"shortest_edge": 16, "longest_edge": 16}),
    ):
        ours = load_processor(checkpoint, image_splitting=splitting, longest_edge=longest)
        reference = transformers.Idefics2ImageProcessor(do_image_splitting=bool(splitting), size=size)
        expected = reference([[image]], return_tensors="pt")
        got = ours.image_processor([[image]])
        assert got["pixel_values"].shape[1] == (5 if splitting else 1)
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
        assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"].long())
        # the text expands to as many image blocks: 4 crops and the whole image with splitting
        ids = ours(images=[[image]], text=["<image>Hi"], return_tensors="pt")["input_ids"]
        assert int((ids == ours.image_token_id).sum()) == (5 if splitting else 1) * ours.image_seq_len


def test_finetune_from_a_saved_dataset_trains_as_from_jsonl_and_exports_the_overrides(
    checkpoint: Path, scenes: tuple[Path, list[list[str]]], tmp_path: Path
) -> None:
    folder, names = scenes
    records = [{"question": q, "answer": a, "images": row} for row, q, a in zip(names, QUESTIONS, ANSWERS)]
    jsonl = _write_jsonl(folder / "run.jsonl", records)
    dataset = datasets.Dataset.from_dict(
        {"question": list(QUESTIONS), "answer": list(ANSWERS), **_image_features(names, folder)}
    )
    dataset.save_to_disk(str(folder / "run"))
    settings = dict(
        model=str(checkpoint),
        lora_r=4,
        lr=1e-2,
        warmup_steps=0,
        max_steps=3,
        batch_size=2,
        threads=1,
        image_splitting=True,
        longest_edge=48,
    )
    finetune(FinetuneConfig(data=str(jsonl), out_dir=str(tmp_path / "jsonl"), **settings))  # type: ignore[arg-type]
    finetune(
        FinetuneConfig(data=str(folder / "run"), out_dir=str(tmp_path / "saved"), merge=True, **settings)
    )  # type: ignore[arg-type]
    assert _history(tmp_path / "saved") == _history(tmp_path / "jsonl")
    exported = load_processor(tmp_path / "saved" / "model").image_processor
    assert exported.do_image_splitting is True and exported.size == {"shortest_edge": 32, "longest_edge": 48}


def test_the_image_flags_parse_as_overrides_or_none() -> None:
    import argparse

    from idefics2.finetune.command import register_finetune_command

    parser = argparse.ArgumentParser()
    register_finetune_command(parser.add_subparsers())
    required = ["finetune", "--model", "m", "--data", "d"]
    args = parser.parse_args(required)
    assert (args.image_splitting, args.longest_edge, args.report_to, args.lr_schedule) == (
        None,
        None,
        "none",
        "cosine",
    )
    assert parser.parse_args([*required, "--image-splitting"]).image_splitting is True
    args = parser.parse_args([*required, "--no-image-splitting", "--longest-edge", "448"])
    assert (args.image_splitting, args.longest_edge) == (False, 448)
    with pytest.raises(ValueError, match="--longest-edge must be positive, got 0"):
        FinetuneConfig(model="m", data="d", longest_edge=0)
    with pytest.raises(ValueError, match="--lr-schedule must be one of cosine, linear, constant_with_warmup"):
        FinetuneConfig(model="m", data="d", lr_schedule="step")
