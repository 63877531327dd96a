"""The CLI: answers, JSON output, info, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_doc_example import hub_like_checkpoint  # noqa: F401 - a fixture

from conftest import EXAMPLES
from idefics2.cli import main


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 390, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_json_reports_the_answer_and_token_count(hub_like_checkpoint: Path, photo: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(hub_like_checkpoint), "--image", str(photo), "--max-new-tokens", "3",
                 "--json", "What is this?"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "What is this?" and 1 <= out["new_tokens"] <= 3 and isinstance(out["answer"], str)


def test_info_prints_parameter_counts_and_files(hub_like_checkpoint: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(hub_like_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "vision: 32 wide x 2 layers, patch 14" in out and "model.safetensors" in out and "total" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--image", "no/such.png", "hi"], "idefics2: error: image not found: no/such.png"),
    (["generate", "<image>What is this?"], "idefics2: error: the prompt holds <image>"),
    (["generate", "--model", "no/such/folder/x", "hi"], "idefics2: error: 'no/such/folder/x' is not a folder"),
])
def test_user_mistakes_end_in_one_line_and_exit_code_1(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_an_unreadable_image_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    assert main(["generate", "--image", str(bad), "hi"]) == 1
    assert capsys.readouterr().err.startswith(f"idefics2: error: cannot read image {bad}")


def test_a_bad_flag_exits_with_argparse_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--max-new-tokens", "many", "hi"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_an_invalid_generation_value_is_a_one_line_error(hub_like_checkpoint: Path, photo: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(hub_like_checkpoint), "--image", str(photo), "--top-p", "1.5", "hi"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("idefics2: error:") and "top_p" in err and err.count("\n") == 1


def test_chat_carries_the_conversation_in_the_chat_format(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    from idefics2 import cli

    prompts: list[str] = []
    real_answer = cli.answer

    def spy(model, processor, messages, images, args, stream):  # type: ignore[no-untyped-def]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        return real_answer(model, processor, messages, images, args, stream)

    monkeypatch.setattr(cli, "answer", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What color is the circle?\nWhat is <image>?\n"
                                                  "How many shapes are there?\n/quit\n"))
    examples = EXAMPLES
    assert cli.main(["chat", "--image", str(examples / "shapes.png")]) == 0
    captured = capsys.readouterr()
    answers = captured.out.splitlines()
    assert answers[0] == "Red." and answers[1].endswith(".") and len(answers) == 2
    assert "idefics2: error: the prompt holds <image>" in captured.err  # that line is refused, the chat goes on
    assert prompts[1] == ("User:<image>What color is the circle?<end_of_utterance>\nAssistant: Red.<end_of_utterance>\n"
                          "User: How many shapes are there?<end_of_utterance>\nAssistant:")
