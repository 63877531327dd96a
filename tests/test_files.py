"""Hostile and broken checkpoint folders: files outside the folder, broken shards and indexes,
configs that do not fit the weights, saves interrupted at any point, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, files
from idefics2.cli import main
from idefics2.finetune.run_folder import append_history, start_history
from idefics2.lora import LoRAConfig

CONFIG = tiny_config_dict()


def saved(folder: Path, shard_size: str | None = None) -> Path:
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    return folder


def sharded(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    folder = saved(tmp_path / "ckpt", "20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder, index


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "C:\\evil.safetensors"])
def test_index_entries_outside_the_folder_are_refused_before_opening(tmp_path: Path, entry: str) -> None:
    folder, index = sharded(tmp_path)
    shutil.copy(folder / sorted(set(index["weight_map"].values()))[0], tmp_path / "outside.safetensors")
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = entry
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"weight_map\[{re.escape(repr(key))}\].*points outside the folder"):
        Idefics2ForConditionalGeneration.from_pretrained(folder)
    assert main(["info", "--model", str(folder)]) == 1


def test_a_hub_cache_snapshot_of_symlinks_still_loads(tmp_path: Path) -> None:
    """The Hub cache: snapshots/<rev>/<file> are links to ../../blobs/<hash>."""
    original = saved(tmp_path / "ckpt", "20KB")
    blobs = tmp_path / "cache" / "blobs"
    snapshot = tmp_path / "cache" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(original.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    model = Idefics2ForConditionalGeneration.from_pretrained(snapshot)
    reference = Idefics2ForConditionalGeneration.from_pretrained(original)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes(b""), r"model.safetensors is not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), r"not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:4000]),
     r"model.safetensors"),
])
def test_broken_safetensors_are_one_value_error_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    folder = saved(tmp_path / "ckpt")
    damage(folder)
    with pytest.raises(ValueError, match=message):
        Idefics2ForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("index, message", [
    ({"metadata": {}}, r"weight_map must be an object"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, r"weight_map must be an object.*got list"),
    ([1, 2], r"is not a JSON object"),
])
def test_malformed_indexes(tmp_path: Path, index: object, message: str) -> None:
    folder, _ = sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        Idefics2ForConditionalGeneration.from_pretrained(folder)


def test_integer_and_mixed_dtype_weights_are_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    name = "model.text_model.layers.0.mlp.up_proj.weight"
    save_file({**tensors, name: tensors[name].to(torch.int32)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"not floating point.*{re.escape(name)}: torch.int32"):
        Idefics2ForConditionalGeneration.from_pretrained(folder)
    save_file({**tensors, name: tensors[name].half()}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"mixes tensor dtypes \(\['torch.float16', 'torch.float32'\]\).*dtype="):
        Idefics2ForConditionalGeneration.from_pretrained(folder)
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype="float32")  # converted: fine
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_config_asking_for_more_layers_than_the_weights_fails_before_building(tmp_path: Path) -> None:
    folder = saved(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 9000  # within the config's own cap (10,000)
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"text_config.num_hidden_layers is 9000, but the weights hold 2"):
        Idefics2ForConditionalGeneration.from_pretrained(folder)
    assert time.perf_counter() - start < 10  # refused from the keys, not after building 9000 layers
    config["text_config"]["num_hidden_layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json.*num_hidden_layers"):
        Idefics2ForConditionalGeneration.from_pretrained(folder)


def test_a_save_swaps_in_one_step_and_cleans_what_killed_saves_left(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = saved(tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text("{}")  # saved beside the model: carried over
    dead = tmp_path / ".ckpt.tmp-999999999-x"  # a killed save's partial shards (no such process)
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-y"  # another running process's: left alone
    live.mkdir()
    seen: list[bool] = []

    def check_during_swap(path: object, *args: object, **kwargs: object) -> None:
        # the old folder has been swapped out to the temporary path in one step: the target is whole
        seen.append((folder / "model.safetensors").is_file() and (folder / "config.json").is_file())
        raise OSError("disk failure while removing the old folder")

    monkeypatch.setattr(files.shutil, "rmtree", check_during_swap)
    with pytest.raises(OSError, match="disk failure"):
        saved(folder)
    monkeypatch.undo()
    assert seen == [True]
    Idefics2ForConditionalGeneration.from_pretrained(folder)  # loadable at the path
    assert (folder / "tokenizer.json").read_text() == "{}"
    saved(folder)
    assert not dead.exists() and live.exists()


def test_history_rewrite_on_resume_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2, 3):
        append_history(tmp_path, {"step": step, "loss": 1.0 / step})
    before = (tmp_path / "history.jsonl").read_text()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError):
        start_history(tmp_path, resumed_step=2)
    monkeypatch.undo()
    assert (tmp_path / "history.jsonl").read_text() == before  # nothing lost
    start_history(tmp_path, resumed_step=2)
    assert [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["history.jsonl"]  # no temporary left


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(.*)*x", r"(q|qq)*_proj"])
def test_target_module_regexes_that_can_backtrack_forever_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="exponential time"):
        LoRAConfig(target_modules=pattern)
    assert LoRAConfig(target_modules=r".*\.(q_proj|v_proj)").target_modules  # PEFT's usual form stays


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_lora_alpha_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        LoRAConfig(lora_alpha=alpha)


def test_the_cli_turns_any_failure_into_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = saved(tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"garbage")
    monkeypatch.delenv("IDEFICS2_DEBUG", raising=False)
    assert main(["generate", "--model", str(folder), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable safetensors file" in err
    monkeypatch.setattr("idefics2.cli.cmd_info", lambda args: 1 / 0)
    parser_main = main(["info"])
    err = capsys.readouterr().err
    assert parser_main == 3 and err.count("\n") == 1 and "ZeroDivisionError" in err and "Traceback" not in err


def test_image_files_regular_upright_and_size_checked_before_decoding(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from idefics2.processing.image_file import read_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        read_image(str(fifo))  # would block forever if opened
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (255, 0, 0)).save(rotated, exif=exif)
    transformers = pytest.importorskip("transformers")
    reference = transformers.image_utils.load_image(str(rotated))
    ours = read_image(str(rotated))
    assert ours.size == reference.size == (20, 40) and ours.tobytes() == reference.tobytes()
    huge = tmp_path / "huge.png"
    Image.new("RGB", (2, 2)).save(huge)
    data = bytearray(huge.read_bytes())
    data[16:24] = (13000).to_bytes(4, "big") * 2
    data[29:33] = __import__("zlib").crc32(bytes(data[12:29])).to_bytes(4, "big")
    huge.write_bytes(bytes(data))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the size check"))
    with pytest.raises(ValueError, match=r"13000x13000 = 169000000 pixels, more than the 89478485 allowed"):
        read_image(str(huge))


def test_processor_folders_follow_the_model_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from idefics2 import Idefics2Processor

    asked: list[object] = []

    def not_cached(repo_id: str, **kwargs: object) -> str:
        asked.append(kwargs.get("local_files_only"))
        raise OSError("not cached")

    monkeypatch.delenv("IDEFICS2_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(ValueError, match=r"'org/typo' is not a local folder, nor a Hub repo in the Hugging Face cache"):
        Idefics2Processor.from_pretrained("org/typo")
    assert asked == [True]
